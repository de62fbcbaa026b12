"""``resunet corrections export``: approved review corrections -> an MSD training set with provenance."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "corrections",
        help="turn approved review corrections into a training set (for resunet train --init-from)",
        description="Work with reviewers' corrections (resunet serve --require-review decisions and any other "
        "review.json).",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    e = sub.add_parser(
        "export",
        help="write every approved correction as an MSD dataset",
        description="Write every APPROVED decision with a corrected mask (rejected ones never; approvals of the "
        "model's mask as it was are skipped) as an MSD dataset: DATASET/imagesTr/<case>.nii.gz (the input), "
        "labelsTr/<case>.nii.gz (the corrected mask), dataset.json, and corrections.json (per case: decision id, "
        "reviewer, time, model sha256, hashes of the input and the corrected mask). Case ids are the decision ids "
        "(review-<job id>). Running it again adds only new decisions. Files 0600, folders 0700. Fine-tune with: "
        "resunet train --init-from MODEL.pt --data DATASET --out RUN",
    )
    e.add_argument("--out", required=True, metavar="DATASET",
                   help="dataset folder: new, empty, or an earlier export (then only new decisions are added)")
    e.add_argument("--from", dest="sources", action="append", metavar="FOLDER", default=None,
                   help="where decisions are, searched recursively for review.json: a resunet serve --state-dir "
                   "(STATE/jobs/<id>/review/), or any folder of review decisions (repeatable; default: the "
                   "current folder)")
    e.add_argument("--model", metavar="NAME",
                   help="only decisions on this model: its name (e.g. brain_extraction) or sha256 (or a prefix)")
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_export(args: argparse.Namespace) -> int:
    from resunet.training.corrections import export_corrections

    res = export_corrections(args.sources or ["."], args.out, model=args.model)
    for did, why in res.skipped:
        print(f"skipped {did}: {why}")
    print(f"{len(res.added)} correction(s) added, {len(res.kept)} already there; dataset {res.out} "
          f"({len(res.added) + len(res.kept)} case(s)); fine-tune: resunet train --init-from MODEL.pt "
          f"--data {res.out} --out RUN")
    return 0
