"""GPU check and benchmark (run by hand on a CUDA machine; everything compared is measured in the same run).

    python bench/gpu_check.py --out gpu.md            # on a machine with CUDA, from the repository root
    python bench/gpu_check.py --device cpu --quick    # shake-down of the script itself on a CPU

What it does, each section on its own so that one failure does not hide the others:

1. Networks: one training step (forward + backward + SGD) on ``2 x 1 x 128^3`` under bf16 autocast,
   median of ``--reps`` steps after warm-up: ours (channels-last and not) against MONAI's UNet,
   SegResNet, BasicUNet and nnU-Net's ResEnc-M (dynamic-network-architectures, when importable);
   peak GPU memory and achieved TFLOP/s (counted FLOPs: forward x 3 for the step).
2. Training: ``resunet train --device cuda`` on a tiny generated MSD dataset: bf16 AMP with
   channels-last (2 epochs; the log's GPU memory and utilisation columns), fp16 with the gradient
   scaler killed after 1 epoch's checkpoint and continued with ``--resume``, and ``compile=true``.
3. Prediction with the bundled model: the example study and a 1 mm version of it, fp32 versus AMP,
   with and without mirror TTA (warm, median), masks compared with the CPU's; the CLI in a fresh
   process; a 512 x 512 x 600 CT through ``resunet predict --device cuda`` with peak GPU memory and
   peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from bench_predict import BUNDLED, EXAMPLE, first_case, write_synthetic_ct  # noqa: E402
OUT_LINES: list[str] = []


OUT_FILE: list[Path] = []


def say(*lines: str) -> None:
    for ln in lines:
        print(ln, flush=True)
        OUT_LINES.append(ln)
    if OUT_FILE:  # rewritten (atomically) as it goes, so a run stopped at its time limit still leaves its results
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(OUT_FILE[0], "\n".join(OUT_LINES) + "\n")


def section(title: str, fn: Callable[[], None]) -> None:
    say("", f"## {title}", "")
    t0 = time.perf_counter()
    try:
        fn()
    except Exception:  # a benchmark script: report and go on with the next section
        say("```", traceback.format_exc()[-3000:], "```")
    say("", f"({time.perf_counter() - t0:.0f} s)")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------ 1. networks
def bench_networks(dev: torch.device, size: int, reps: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    import bench_nets as bn

    names = ["cpu cl", "small cl", "base", "base cl", "gpu cl", "resnet18 cl", "monai_unet", "monai_segresnet",
             "monai_basicunet", "nnunet_resenc_m"]
    amp = dev.type == "cuda"
    say(f"Patch 2 x 1 x {size}^3, SGD step, {'bf16 autocast' if amp else 'fp32'}; median of {reps} steps after 2 "
        "warm-up steps; TFLOP/s = 3 x counted forward FLOPs / step time.", "",
        "| model | params (M) | fwd GFLOP / sample | train step (ms) | peak GPU mem (GiB) | achieved TFLOP/s |",
        "|---|---|---|---|---|---|")
    for name in names:
        try:
            one_network(dev, name, bn.MODELS[name], size, reps, amp, FlopCounterMode)
        except Exception as err:  # noqa: BLE001 - a missing peer package, out of memory, ...
            say(f"| {name} | failed: {type(err).__name__}: {str(err)[:160]} | | | | |")
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def one_network(dev: torch.device, name: str, build: Callable[[], Any], size: int, reps: int, amp: bool,
                flop_counter: Any) -> None:
    """One row of section 1: build the network, count its forward FLOPs, time its training steps."""
    net, dims, cl = build()
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    net = net.to(dev, memory_format=fmt).train()
    x = torch.randn(2, 1, size, size, size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (2, size, size, size), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    with flop_counter(display=False) as fc, torch.no_grad():
        net.eval()(x[:1])
    gflop = fc.get_total_flops() / 1e9
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):
        step()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    params = sum(p.numel() for p in net.parameters()) / 1e6
    say(f"| {name} | {params:.1f} | {gflop:.1f} | {1000 * t:.1f} | {mem:.2f} | {3 * 2 * gflop / t / 1000:.1f} |")


# ------------------------------------------------------------------------------------ 2. training
def run_cli(args: list[str], timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "resunet", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        code, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as err:
        code, text = -9, f"timed out after {timeout} s: {(err.stdout or b'')[-500:]!r}"
    return code, time.perf_counter() - t0, text


def bench_training(dev: torch.device, tmp: Path) -> None:
    from test_training import make_msd

    data = make_msd(tmp / "ds", n_cases=6)
    common = ["--data", str(data), "--device", dev.type, "--preset", "small", "--set", "dataset.folds=3",
              "--set", "dataset.num_workers=2", "--set", "iterations_per_epoch=8", "--set", "progress=false",
              "--set", "tensorboard=false"]
    say("Tiny MSD dataset (6 spheres, 20^3), preset small, 8 steps per epoch.", "",
        "| run | exit | wall s | epochs logged | last row of log.csv (epoch,time_s,samples_per_s,lr,loss,dice,...,gpu_mem_mb,gpu_util) | checkpoint |",
        "|---|---|---|---|---|---|")

    def report(name: str, run: Path, code: int, wall: float, text: str) -> None:
        log = (run / "log.csv").read_text().splitlines() if (run / "log.csv").exists() else []
        ck = ""
        if (run / "last.pt").exists():
            from resunet.training.checkpoint import load_checkpoint

            last = load_checkpoint(run / "last.pt")
            st = last.train_state or {}
            ck = (f"last.pt epoch {st.get('epoch')}, scaler state {'saved' if st.get('scaler') else 'none'}, "
                  f"versions {last.versions.get('torch')}")
        say(f"| {name} | {code} | {wall:.1f} | {max(len(log) - 1, 0)} | {log[-1] if len(log) > 1 else ''} | {ck} |")
        if code != 0 and text:
            say("", "```", text[-2500:], "```", "")

    run = tmp / "bf16"
    code, wall, text = run_cli(["train", *common, "--out", str(run), "--epochs", "2"], 240)
    report("amp auto (bf16), channels-last, 2 epochs", run, code, wall, text)
    run = tmp / "fp16"
    fp16 = ["train", *common, "--out", str(run), "--epochs", "3", "--set", "amp=fp16"]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "resunet", *fp16], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    while not (run / "last.pt").exists() and proc.poll() is None and time.perf_counter() - t0 < 240:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report(f"fp16 + GradScaler, 3 epochs planned, SIGKILL after the first checkpoint (returncode {proc.returncode})",
           run, proc.returncode, time.perf_counter() - t0, "")
    code, wall, text = run_cli([*fp16, "--resume"], 240)
    report("same run, --resume", run, code, wall, text)
    run = tmp / "compiled"
    code, wall, text = run_cli(["train", *common, "--out", str(run), "--epochs", "1", "--set", "compile=true"], 240)
    report("compile=true, 1 epoch", run, code, wall, text)


# ------------------------------------------------------------------------------------ 3. prediction
def one_mm_example(tmp: Path) -> Path:
    """The example study upsampled to 1 mm (linear), same field of view: a 182 x 218 x 182 input."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(EXAMPLE))
    data = ndimage.zoom(np.asanyarray(img.dataobj).astype(np.float32), 2, order=1)
    aff = img.affine.copy()
    aff[:3, :3] /= 2
    aff[:3, 3] -= img.affine[:3, :3] @ np.full(3, 0.25)  # keep the outer corners of the grid
    out = tmp / "colin27_1mm.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(out))
    return out


def bench_predict(dev: torch.device, tmp: Path, reps: int) -> None:
    from resunet.inference import Predictor
    from resunet.io.loader import load_study

    say("Bundled model (brain_extraction.pt). Warm Predictor, median of the timed runs; `network` = time inside "
        "the network calls. Masks compared with the CPU Predictor's (same settings, fp32).", "",
        "| input | device | AMP | TTA | case s (median) | network s | voxels differing from CPU mask | Dice vs CPU |",
        "|---|---|---|---|---|---|---|---|")
    inputs = [EXAMPLE, one_mm_example(tmp)]
    for path in inputs:
        vol = load_study(path)
        for tta in (False, True):
            ref = Predictor(BUNDLED, device="cpu", tta=tta).predict(vol).mask.array
            for amp in ((False, True) if dev.type == "cuda" else (False,)):
                p = Predictor(BUNDLED, device=dev, tta=tta, amp=amp)
                p.predict(vol)  # warm-up (cuDNN autotuning, allocator)
                runs = []
                for _ in range(reps):
                    sync(dev)
                    t0 = time.perf_counter()
                    pred = p.predict(vol)
                    sync(dev)
                    runs.append((time.perf_counter() - t0, pred.timings.get("network", float("nan"))))
                m = pred.mask.array
                differ = int((m != ref).sum())
                inter = float(((m > 0) & (ref > 0)).sum())
                dice = 2 * inter / max(float((m > 0).sum() + (ref > 0).sum()), 1.0)
                say(f"| {path.name} {vol.shape} | {dev.type} | {amp} | {tta} | "
                    f"{statistics.median(r[0] for r in runs):.3f} | {statistics.median(r[1] for r in runs):.3f} | "
                    f"{differ} of {m.size} | {dice:.5f} |")

    code, wall, text = run_cli(["predict", str(EXAMPLE), "--out", str(tmp / "cli"), "--device", dev.type,
                                "--no-audit", "--no-progress"], 180)
    case = first_case(tmp / "cli")
    say("", f"`resunet predict {EXAMPLE.name} --device {dev.type}` (defaults: TTA on, AMP on CUDA) in a fresh "
        f"process: exit {code}, whole command {wall:.1f} s, case {case.get('seconds')} s, stages {case.get('timings')}")
    if code != 0:
        say("```", text[-2000:], "```")


def bench_big_ct(dev: torch.device, tmp: Path) -> None:
    path = write_synthetic_ct(tmp / "ct512.nii")
    code = ("import resource, sys, torch; from resunet.cli import main; c = main(sys.argv[1:]); "
            "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); "
            "print('PEAK_GPU_MB', torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0); "
            "sys.exit(c)")
    for tta in ("--no-tta", "--tta"):
        out = tmp / f"ct{tta}"
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, "predict", str(path), "--out", str(out), "--device",
                              dev.type, "--no-audit", "--no-progress", tta], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        wall = time.perf_counter() - t0
        vals = dict(ln.split()[:2] for ln in res.stdout.splitlines() if ln.startswith("PEAK_"))
        case = first_case(out)
        say(f"- CT 512x512x600 int16, `resunet predict {tta} --device {dev.type}`: exit {res.returncode}, "
            f"{wall:.1f} s wall, case {case.get('seconds')} s, peak RSS {vals.get('PEAK_RSS_MB')} MB, peak GPU "
            f"memory allocated {vals.get('PEAK_GPU_MB')} MB, stages {case.get('timings')}")
        if res.returncode != 0:
            say("```", (res.stdout + res.stderr)[-2000:], "```")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (to test the script)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: nets,train,predict,ct")
    ap.add_argument("--out", default="gpu.md")
    args = ap.parse_args()
    dev = torch.device(args.device)
    OUT_FILE.append(Path(args.out))
    skip = set(filter(None, args.skip.split(",")))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    say("# GPU check (bench/gpu_check.py)", "",
        f"`python bench/gpu_check.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {dev} ({gpu}), {os.cpu_count()} CPUs")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
        tmp = Path(d)
        if "nets" not in skip:
            section("1. Networks: training step", lambda: bench_networks(dev, 64 if args.quick else 128,
                                                                         1 if args.quick else 10))
        if "train" not in skip:
            section("2. resunet train on CUDA", lambda: bench_training(dev, tmp))
        if "predict" not in skip:
            section("3. Prediction: fp32 vs AMP, TTA, masks vs CPU", lambda: bench_predict(dev, tmp, 1 if args.quick else 3))
        if "ct" not in skip:
            section("4. Big CT through the CLI", lambda: bench_big_ct(dev, tmp))
    say("", f"peak RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
