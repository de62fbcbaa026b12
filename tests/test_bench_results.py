"""bench/results/*.md are the bench scripts' own output (issue 27 point 6).

Each results file written from a JSON of figures is rendered again here from that JSON with the
script's own renderer and must equal the committed file byte for byte, so prose or figures edited by
hand (or a renderer changed without rewriting the file) fail. The renderers' comparisons are checked
on small hand-made runs: like-for-like pairs only, pending where a side was not measured. The README's
headline figures must be the ones the results files print.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def bench_module(name: str):
    """Import ``bench/<name>.py`` (not a package) under its own name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script, stem", [("bench_nets", "nets")])
def test_results_file_is_the_scripts_rendering_of_its_json(script, stem):
    mod = bench_module(script)
    doc = json.loads((RESULTS / f"{stem}.json").read_text())
    assert mod.render(doc) == (RESULTS / f"{stem}.md").read_text()


def _nets_row(name: str, step: float, gflops: float | None = None) -> dict:
    dims = 2 if "_2d" in name else 3
    return {"name": name, "dims": dims, "params_m": 1.0, "gflop": 1.0, "fwd_s": 0.5, "step_s": step,
            "rss_mib": 100.0, "gflops": gflops if gflops is not None else 10.0 / step, "matmul_gflops": 100.0,
            "pct": 10.0}


def _nets_run(rows: list[dict]) -> dict:
    return {"command": "x", "started_utc": "2026-01-01 00:00", "finished_utc": "00:10", "torch": "t", "machine": "m",
            "threads": 2, "reps": 3, "matmul_gflops_start": 100.0, "load_start": 0.1, "load_end": 0.2, "rows": rows}


def _pair_lines(text: str) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[2] in ("contiguous", "channels-last"):
            out[(cells[0], cells[1])] = cells
    return out


def test_nets_compares_like_for_like_and_marks_the_missing_side_pending():
    mod = bench_module("bench_nets")
    # ours is faster only because it ran channels-last: across layouts 2x, like for like 1.25x and 1.0x
    text = mod.render({"runs": [_nets_run([_nets_row("cpu", 1.6), _nets_row("cpu cl", 1.0),
                                           _nets_row("monai_unet", 2.0)])]})
    pairs = _pair_lines(text)
    assert pairs[("cpu", "monai_unet")][3:6] == ["1.60", "2.00", "1.25x"]
    assert pairs[("cpu cl", "monai_unet cl")][3:6] == ["1.00", "pending", "pending"]
    assert "2.00x" not in text  # the cross-layout ratio is never written
    assert "| monai_unet cl | pending: not in this run |" in text
    assert mod.STANDARD_COMMAND in text
    text = mod.render({"runs": [_nets_run([_nets_row("cpu cl", 1.0), _nets_row("monai_unet cl", 1.5)])]})
    assert _pair_lines(text)[("cpu cl", "monai_unet cl")][3:6] == ["1.00", "1.50", "1.50x"]
    # the best achieved GFLOP/s is taken per layout, ours and peers apart
    text = mod.render({"runs": [_nets_run([_nets_row("base", 1.0, 50.0), _nets_row("base cl", 1.0, 70.0),
                                           _nets_row("nnunet_resenc_m", 1.0, 60.0)])]})
    assert "| contiguous | base 50.0 | nnunet_resenc_m 60.0 |" in text
    assert "| channels-last | base cl 70.0 | pending |" in text


def test_nets_every_network_runs_in_both_layouts_and_the_standard_list_has_both():
    mod = bench_module("bench_nets")
    for base in mod.NETWORKS:
        assert base in mod.MODELS and f"{base} cl" in mod.MODELS
        assert (base in mod.STANDARD) == (f"{base} cl" in mod.STANDARD)
    for ours, peer, _ in mod.PAIRS:
        assert {ours, f"{ours} cl", peer, f"{peer} cl"} <= set(mod.STANDARD)


def test_readme_headline_is_the_like_for_like_figure_of_nets_md():
    readme = (REPO / "README.md").read_text()
    got = re.search(r"`cpu` trains fastest on a CPU \((\d+\.\d+)x\s+MONAI's UNet per training step, both in the "
                    r"default layout", readme)
    assert got, "README's cpu-preset headline changed: keep it the like-for-like figure of bench/results/nets.md"
    pairs = _pair_lines((RESULTS / "nets.md").read_text().split("## Earlier run")[0])
    assert pairs[("cpu", "monai_unet")][5] == f"{got.group(1)}x"
