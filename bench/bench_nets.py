"""Benchmark: resunet's 3D presets against MONAI, nnU-Net and smp networks, same run, same machine.

Run by hand (not part of the test suite)::

    .venv/bin/python bench/bench_nets.py --reps 3 --out bench/results/nets.md   # the results file (idle machine)
    .venv/bin/python bench/bench_nets.py --skip-slow     # the standard list without ResEnc-M
    .venv/bin/python bench/bench_nets.py --models "small,small cl,monai_unet,monai_unet cl"
    .venv/bin/python bench/bench_nets.py --render bench/results/nets.json --out bench/results/nets.md

``--out FILE.md`` writes the whole results file (prose, table and the like-for-like comparisons,
all generated here) and ``FILE.json`` beside it (the same figures as data), both atomically;
``--render`` rewrites the Markdown from the JSON alone, so the file is always this script's output.

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
Every network, ours and the peers, can run in the contiguous layout (``NAME``) and in
``torch.channels_last_3d`` / ``channels_last`` (``NAME cl``: weights and input converted); the
comparisons in the results file pair ours and a peer in the same layout only (like for like), and a
pair one of whose rows was not measured is written as pending with the command that measures it.
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
def _ours(name: str) -> Callable[[], tuple[torch.nn.Module, int]]:
    def build():
        from resunet.nets import ResUNet

        d = 2 if name.endswith("_2d") else 3
        preset = name.removesuffix("_2d")
        return ResUNet.from_preset(preset, spatial_dims=d, in_channels=1, out_channels=2), d

    return build


def _monai_unet():
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2), 3


def _monai_segresnet():
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=2), 3


def _monai_basicunet():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2), 3


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
    return net, 3


def _smp_unet_resnet34():
    _torchvision_cpu_shim()
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=2), 2


def _torchvision_cpu_shim() -> None:
    """Let PyPI's CUDA torchvision import beside CPU torch: define the op schemas it expects."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    globals()["_TV_LIB"] = lib  # keep the library object alive


#: Networks by name; ``"NAME cl"`` runs NAME in channels-last (any of them).
NETWORKS: dict[str, Callable[[], tuple[torch.nn.Module, int]]] = {
    "cpu": _ours("cpu"),
    "small": _ours("small"),
    "base": _ours("base"),
    "gpu": _ours("gpu"),
    "resnet18": _ours("resnet18"),
    "resnet34": _ours("resnet34"),
    "resnet50": _ours("resnet50"),
    "resnet34_2d": _ours("resnet34_2d"),
    "monai_unet": _monai_unet,
    "monai_segresnet": _monai_segresnet,
    "monai_basicunet": _monai_basicunet,
    "nnunet_resenc_m": _resenc_m,
    "smp_unet_resnet34_2d": _smp_unet_resnet34,
}
OURS = {"cpu", "small", "base", "gpu", "resnet18", "resnet34", "resnet50", "resnet34_2d"}
MODELS = [n for base in NETWORKS for n in (base, f"{base} cl")]
SLOW = {"nnunet_resenc_m", "nnunet_resenc_m cl", "resnet34", "resnet34 cl", "resnet50", "resnet50 cl"}
#: The results file's list: every network of the comparisons below in both layouts.
STANDARD = [f"{n}{cl}" for n in ("cpu", "small", "base", "resnet18", "monai_unet", "monai_segresnet",
                                 "monai_basicunet", "nnunet_resenc_m", "resnet34_2d", "smp_unet_resnet34_2d")
            for cl in ("", " cl")]
STANDARD_COMMAND = ".venv/bin/python bench/bench_nets.py --reps 3 --out bench/results/nets.md"
#: (ours, peer, why): the training-step comparisons written for each layout.
PAIRS = [
    ("cpu", "monai_unet", "the CPU preset against MONAI's UNet (similar size: 5.7 vs 4.8 M parameters)"),
    ("small", "monai_unet", "the bundled model's preset against MONAI's UNet"),
    ("resnet34_2d", "smp_unet_resnet34_2d", "2D: our resnet34 U-Net against smp's Unet('resnet34') at 512^2"),
]


def _split(name: str) -> tuple[str, bool]:
    """``"cpu cl"`` -> ``("cpu", True)``."""
    return (name[:-3], True) if name.endswith(" cl") else (name, False)


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
    base, channels_last = _split(name)
    net, d = NETWORKS[base]()
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
    ap.add_argument("--models", default=",".join(STANDARD),
                    help="comma-separated subset of: " + ", ".join(MODELS) + " (default: the results file's list; 'all': every one)")
    ap.add_argument("--skip-slow", action="store_true", help="leave out " + ", ".join(sorted(SLOW)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument("--out", type=Path, help="write the whole results file (Markdown) here, and its figures to the same name .json")
    ap.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON of an earlier run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.reps)))
        return 0
    if args.render:
        if not args.out:
            ap.error("--render needs --out")
        write_results(json.loads(args.render.read_text()), args.out, json_too=args.render.resolve() != args.out.with_suffix(".json").resolve())
        return 0

    names = MODELS if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {MODELS}")
    if args.skip_slow:
        names = [n for n in names if n not in SLOW]
    torch.set_num_threads(args.threads)
    mm = matmul_gflops()
    started = _dt.datetime.now(_dt.timezone.utc)
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
    argv_text = " ".join(f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
    run = {
        "command": f".venv/bin/python bench/bench_nets.py {argv_text}".strip(),
        "started_utc": started.strftime("%Y-%m-%d %H:%M"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M"),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "reps": args.reps, "matmul_gflops_start": mm,
        "load_start": load, "load_end": os.getloadavg()[0], "rows": rows,
    }
    text = render({"runs": [run]})
    print("\n" + text)
    if args.out:
        write_results({"runs": [run]}, args.out)
    return 0


def write_results(doc: dict[str, Any], out: Path, json_too: bool = True) -> None:
    """``out`` (Markdown, rendered from ``doc``) and ``out`` with ``.json`` (``doc``), each atomically."""
    from resunet.io.atomic import atomic_write_text

    if json_too:
        atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out, render(doc))


HEADER = """# Network benchmark (bench/bench_nets.py)

Written whole by `bench/bench_nets.py --out bench/results/nets.md`, figures as data in
`bench/results/nets.json`; `.venv/bin/python bench/bench_nets.py --render bench/results/nets.json --out
bench/results/nets.md` rewrites this file from the JSON.

Patch 96^3 (3D, 1 channel, 2 classes) and 512^2 (2D). GFLOP = forward FLOPs per sample
(FlopCounterMode); fwd = eval forward 1 x 1 x 96^3; step = forward + backward + SGD on 2 x 1 x 96^3
(2D: 2 x 1 x 512^2); achieved GFLOP/s = counted training-step FLOPs / step time; `cl` = channels-last
(weights and input); "% of matmul" divides by the fp32 4096^2 matmul measured inside the same
subprocess right after its timings. One subprocess per model; each time is the median of `--reps`
timed repetitions after the FLOP-counting pass (which doubles as warm-up).
"""

TABLE_HEAD = (
    "| model | dims | params (M) | GFLOP / sample | fwd 1x (s) | train step 2x (s) | peak RSS (MiB) "
    "| achieved GFLOP/s | matmul GFLOP/s (same process) | % of matmul |\n|---|---|---|---|---|---|---|---|---|---|"
)


def render(doc: dict[str, Any]) -> str:
    """The whole results file for ``doc`` (``{"runs": [run, ...]}``, the first the main run)."""
    parts = [HEADER]
    for k, run in enumerate(doc["runs"]):
        title = "## Run" if k == 0 else f"## Earlier run {k}"
        parts.append(_render_run(run, title))
    return "\n".join(parts)


def _render_run(run: dict[str, Any], title: str) -> str:
    rows = {r["name"]: r for r in run["rows"]}
    measured = [r["name"] for r in run["rows"]]
    pending = [n for n in STANDARD if n not in rows]
    when = f"{run['started_utc']}-{run['finished_utc']} UTC" if run.get("started_utc") else "(time not recorded)"
    mm, l0, l1 = (_fmt(run.get(k), ".0f" if k.startswith("matmul") else ".1f")
                  for k in ("matmul_gflops_start", "load_start", "load_end"))
    lines = [
        f"{title} {when}", "",
        f"Command: `{run['command']}`", "",
        f"torch {run['torch']}; {run['machine']}; {run['threads']} threads (`torch.set_num_threads`); fp32 matmul "
        f"4096^2 at the start {mm} GFLOP/s; load average {l0} at the start, {l1} at the end; `--reps {run['reps']}`.", "",
    ]
    if run.get("note"):
        lines += [run["note"], ""]
    lines.append(TABLE_HEAD)
    lines += [_row(rows[n]) for n in measured]
    if k_main := (title == "## Run"):
        lines += [f"| {n} | pending: not in this run |||||||||" for n in pending]
    if pending and k_main:
        lines += ["", f"Pending rows: measure with `{STANDARD_COMMAND}` on an idle machine (it runs every row)."]
    lines += ["", "### Like for like: training step, ours against a peer in the same layout, same run", "",
              "| ours | peer | layout | ours step (s) | peer step (s) | peer / ours | what |", "|---|---|---|---|---|---|---|"]
    for ours, peer, why in PAIRS:
        for layout, suffix in (("contiguous", ""), ("channels-last", " cl")):
            a, b = rows.get(ours + suffix), rows.get(peer + suffix)
            if a is None and b is None:
                continue
            fa = f"{a['step_s']:.2f}" if a and "error" not in a else "pending"
            fb = f"{b['step_s']:.2f}" if b and "error" not in b else "pending"
            if not k_main and "pending" in (fa, fb):
                continue
            ratio = f"{b['step_s'] / a['step_s']:.2f}x" if "pending" not in (fa, fb) else "pending"
            lines.append(f"| {ours}{suffix} | {peer}{suffix} | {layout} | {fa} | {fb} | {ratio} | {why} |")
    lines += ["", "`peer / ours` above 1: ours trains faster per step. Pairs across layouts are not compared."]
    if not k_main:
        return "\n".join(lines) + "\n"
    lines += ["", "### Achieved GFLOP/s per layout (3D)", "",
              "| layout | ours, best | peers, best |", "|---|---|---|"]
    for layout, cl in (("contiguous", False), ("channels-last", True)):
        def best(group: set[str]) -> str:
            got = [(r["gflops"], r["name"]) for r in run["rows"]
                   if "error" not in r and r.get("gflops") is not None and r["dims"] == 3 and _split(r["name"])[1] == cl and _split(r["name"])[0] in group]
            if not got:
                return "pending"
            g, n = max(got)
            return f"{n} {g:.1f}"
        peers = set(NETWORKS) - OURS
        lines.append(f"| {layout} | {best(OURS)} | {best(peers)} |")
    return "\n".join(lines) + "\n"


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {r['error']} ||||||||"
    f = {k: _fmt(r.get(k), spec) for k, spec in (("params_m", ".1f"), ("gflop", ".1f"), ("fwd_s", ".2f"), ("step_s", ".2f"),
                                                 ("rss_mib", ".0f"), ("gflops", ".1f"), ("matmul_gflops", ".0f"))}
    pct = f"{r['pct']:.0f}%" if r.get("pct") is not None else "-"
    return (
        f"| {r['name']} | {r['dims']}D | {f['params_m']} | {f['gflop']} | {f['fwd_s']} | {f['step_s']} "
        f"| {f['rss_mib']} | {f['gflops']} | {f['matmul_gflops']} | {pct} |"
    )


def _fmt(v: float | None, spec: str) -> str:
    """``v`` formatted, ``-`` where the run did not record it."""
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
