"""Benchmark: resunet's 3D presets against MONAI, nnU-Net and smp networks, same run, same machine.

Run by hand (not part of the test suite)::

    .venv/bin/python bench/bench_nets.py                 # everything (ResEnc-M takes minutes)
    .venv/bin/python bench/bench_nets.py --skip-slow     # without ResEnc-M and the big presets
    .venv/bin/python bench/bench_nets.py --models small,monai_unet --out bench/results/nets.md

Peers need the ``bench`` extra: ``pip install -c constraints.txt -e '.[bench]'``
(segmentation_models_pytorch, dynamic-network-architectures). PyPI's torchvision is a CUDA build
that fails to import beside the CPU torch ("operator torchvision::nms does not exist"); this script
defines the missing op schemas with ``torch.library`` before importing smp (see shared NOTES).

Per model, in a fresh subprocess (so peak RSS is that model's alone), with ``torch.set_num_threads``
= ``--threads`` (default 2):
- params: trainable parameters (millions).
- GFLOP: forward FLOPs of one 96^3 (2D: 512^2) sample, ``torch.utils.flop_counter.FlopCounterMode``
  (2 FLOPs per multiply-add; convolutions and matmuls only).
- fwd: median latency of an eval-mode, no-grad forward of ``1 x C x 96^3`` (seconds).
- step: median time of one training step (forward + backward + SGD update) on ``2 x C x 96^3``.
- RSS: peak resident memory of the subprocess (``resource.getrusage``), MiB.
- GFLOP/s: training-step FLOPs (counted, forward + backward) / step time, and the same as a % of
  this machine's fp32 matmul GFLOP/s (4096 x 4096), measured in the same subprocess right after
  the model's timings (the machine is shared; this keeps the ratio meaningful under load).
Our networks run in ``torch.channels_last_3d`` (``cl``) and contiguous layout; peers as their
authors ship them (contiguous).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

PATCH_3D = (96, 96, 96)
PATCH_2D = (512, 512)


# ------------------------------------------------------------------------------------ models
def _ours(name: str, channels_last: bool) -> Callable[[], tuple[torch.nn.Module, int, bool]]:
    def build():
        from resunet.nets import ResUNet

        d = 2 if name.endswith("_2d") else 3
        preset = name.removesuffix("_2d")
        return ResUNet.from_preset(preset, spatial_dims=d, in_channels=1, out_channels=2), d, channels_last

    return build


def _monai_unet():
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2), 3, False


def _monai_segresnet():
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=2), 3, False


def _monai_basicunet():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2), 3, False


def _resenc_m():
    # nnU-Net v2 ResEnc-M 3d_fullres (nnUNetPlannerResEncM): 6 stages 32..320, blocks 1/3/4/6/6/6.
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from torch import nn

    net = ResidualEncoderUNet(
        input_channels=1,
        n_stages=6,
        features_per_stage=(32, 64, 128, 256, 320, 320),
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=(1, 2, 2, 2, 2, 2),
        n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
        num_classes=2,
        n_conv_per_stage_decoder=(1, 1, 1, 1, 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
    return net, 3, False


def _smp_unet_resnet34():
    _torchvision_cpu_shim()
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=2), 2, False


def _torchvision_cpu_shim() -> None:
    """Let PyPI's CUDA torchvision import beside CPU torch: define the op schemas it expects."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    globals()["_TV_LIB"] = lib  # keep the library object alive


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, int, bool]]] = {
    "cpu": _ours("cpu", False),
    "cpu cl": _ours("cpu", True),
    "small": _ours("small", False),
    "small cl": _ours("small", True),
    "base": _ours("base", False),
    "base cl": _ours("base", True),
    "gpu": _ours("gpu", False),
    "gpu cl": _ours("gpu", True),
    "resnet18 cl": _ours("resnet18", True),
    "resnet34 cl": _ours("resnet34", True),
    "resnet50 cl": _ours("resnet50", True),
    "monai_unet": _monai_unet,
    "monai_segresnet": _monai_segresnet,
    "monai_basicunet": _monai_basicunet,
    "nnunet_resenc_m": _resenc_m,
    "resnet34_2d": _ours("resnet34_2d", False),
    "resnet34_2d cl": _ours("resnet34_2d", True),
    "smp_unet_resnet34_2d": _smp_unet_resnet34,
}
SLOW = {"nnunet_resenc_m", "resnet34 cl", "resnet50 cl"}


# ------------------------------------------------------------------------------ measurements
def matmul_gflops(n: int = 4096, reps: int = 5) -> float:
    """Best-of-``reps`` fp32 ``n x n`` matmul throughput (GFLOP/s) with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    # The FLOP-counting pass before each call is the warm-up (oneDNN primitives, allocator).
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(name: str, threads: int, reps: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, d, channels_last = MODELS[name]()
    patch = PATCH_3D if d == 3 else PATCH_2D
    fmt = (torch.channels_last_3d if d == 3 else torch.channels_last) if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6

    def inp(b: int) -> torch.Tensor:
        return torch.randn(b, 1, *patch).contiguous(memory_format=fmt)

    net.eval()
    x1 = inp(1)
    with torch.no_grad():
        gflop = _flops(lambda: net(x1))
        fwd = _median_time(lambda: net(x1), reps)

    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x2 = inp(2)
    target = torch.randint(0, 2, (2, *patch))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = net(x2)
        if isinstance(out, (list, tuple)):
            out = out[0]
        loss = torch.nn.functional.cross_entropy(out, target)
        loss.backward()
        opt.step()

    train_gflop = _flops(step)
    step_s = _median_time(step, reps)
    # Matmul throughput right after this model's timings, in the same process: the machine is
    # shared, so the % of matmul compares against what the CPU delivered at that moment.
    mm = matmul_gflops(reps=3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "name": name, "dims": d, "params_m": params, "gflop": gflop, "fwd_s": fwd, "step_s": step_s,
        "train_gflop": train_gflop, "rss_mib": rss, "matmul_gflops": mm,
    }


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--skip-slow", action="store_true", help="leave out " + ", ".join(sorted(SLOW)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.reps)))
        return 0

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.skip_slow:
        names = [n for n in names if n not in SLOW]
    torch.set_num_threads(args.threads)
    mm = matmul_gflops()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    print(f"fp32 matmul 4096^2: {mm:.0f} GFLOP/s on {args.threads} threads; load average {load:.1f}", flush=True)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name}: failed: {err}", flush=True)
            rows.append({"name": name, "error": err})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["gflops"] = r["train_gflop"] / r["step_s"]
        r["pct"] = 100 * r["gflops"] / r["matmul_gflops"]
        rows.append(r)
        print(_row(r), flush=True)

    header = (
        "| model | dims | params (M) | GFLOP / sample | fwd 1x (s) | train step 2x (s) | peak RSS (MiB) "
        "| achieved GFLOP/s | matmul GFLOP/s (same process) | % of matmul |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    table = "\n".join([header] + [_row(r) for r in rows])
    print("\n" + table)
    if args.out:
        from resunet.io.atomic import atomic_write_text

        cmd = "python bench/bench_nets.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (
            f"# Network benchmark\n\n`{cmd.strip()}`\n\n{started}; torch {torch.__version__}; {platform.processor() or platform.machine()}; "
            f"{args.threads} threads; fp32 matmul 4096^2 at start = {mm:.0f} GFLOP/s; load average at start {load:.1f} "
            f"(at end {os.getloadavg()[0]:.1f})\n\n"
            f"Patch 96^3 (3D, 1 channel, 2 classes) and 512^2 (2D). GFLOP = forward FLOPs per sample; achieved "
            f"GFLOP/s = counted training-step FLOPs / median step time. `cl` = channels-last.\n\n{table}\n"
        )
        atomic_write_text(args.out, text)
    return 0


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {r['error']} ||||||||"
    return (
        f"| {r['name']} | {r['dims']}D | {r['params_m']:.1f} | {r['gflop']:.1f} | {r['fwd_s']:.2f} | {r['step_s']:.2f} "
        f"| {r['rss_mib']:.0f} | {r['gflops']:.1f} | {r['matmul_gflops']:.0f} | {r['pct']:.0f}% |"
    )


if __name__ == "__main__":
    sys.exit(main())
