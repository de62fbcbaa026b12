"""``resunet export --model CKPT --format onnx|torchscript --out FILE``: a portable, self-describing model."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (metadata embedded)",
        description="Export a checkpoint's network to ONNX (run with onnxruntime) or TorchScript. The file "
        "carries the checkpoint's plan, labels, channels, post-processing, model card and source SHA-256, "
        "so `resunet predict --model FILE` runs it with the same pre- and post-processing.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="resunet checkpoint (.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="export format")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (.onnx for ONNX)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resunet.inference.export import export_model
    from resunet.io.hashing import sha256_file

    out = export_model(args.model, args.format, args.out)
    print(f"wrote {out} ({args.format}, sha256 {sha256_file(out)[:16]}...)", file=sys.stderr)
    return 0
