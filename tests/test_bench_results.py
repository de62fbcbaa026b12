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
    if str(REPO / "bench") not in sys.path:  # bench scripts import each other (serve_faults -> bench_serve)
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script, stem", [("bench_nets", "nets"), ("io_read_speed", "io"), ("bench_metrics", "metrics"),
                                          ("bench_pacs", "pacs"), ("bench_serve", "serve"), ("serve_faults", "serve_faults"),
                                          ("bench_memory", "memory"), ("bench_editor", "editor")])
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


def _io_row(series: str, n: int, ours: list[float], theirs: list[float]) -> dict:
    return {"series": series, "slices": n, "mb": 1.0, "resunet_s": ours, "sitk_folder_s": theirs,
            "sitk_execute_s": None, "dcm2niix": "-", "voxels_equal": True, "corners_mm": 0.0, "load": 0.1}


def _io_run(cmd: str) -> dict:
    return {"command": cmd, "started_utc": "2026-01-01 00:00", "finished_utc": "00:10", "cpus": 2,
            "load_start": 0.1, "load_end": 0.2, "versions": "v"}


def test_io_reports_median_and_spread_and_says_faster_only_when_every_repetition_agrees():
    mod = bench_module("io_read_speed")
    empty = {"runs": [], "rows": []}
    # resunet faster in the median but not in every repetition: "within the spread", never "faster"
    doc = mod.merge(empty, _io_run("a"), [_io_row("uncompressed", 300, [0.8, 0.9, 1.3], [1.0, 1.0, 1.0])])
    text = mod.render(doc)
    assert "| uncompressed | 300 | 1 | - | 0.90 (0.80-1.30) | 1.00 (1.00-1.00) | 0.90 (0.80-1.30) | within the spread (3 repetitions) |" in text
    doc = mod.merge(doc, _io_run("b"), [_io_row("uncompressed", 1000, [0.5, 0.6, 0.7], [1.0, 1.0, 1.0])])
    assert "| 0.60 (0.50-0.70) | resunet faster in all 3 |" in mod.render(doc)
    doc = mod.merge(doc, _io_run("c"), [_io_row("RLE lossless", 300, [2.0], [1.0])])
    assert "| 2.00 | 1 repetition: not enough |" in mod.render(doc)
    # a rerun of a row replaces it, and a run no row refers to any more is dropped
    doc = mod.merge(doc, _io_run("d"), [_io_row("uncompressed", 300, [1.5, 1.6, 1.7], [1.0, 1.0, 1.0])])
    assert [r["command"] for r in doc["runs"]] == ["b", "c", "d"]
    assert [(r["series"], r["slices"], r["run"]) for r in doc["rows"]] == [
        ("uncompressed", 300, 2), ("uncompressed", 1000, 0), ("RLE lossless", 300, 1)]
    assert "| SimpleITK faster in all 3 | - | - | - | equal, 0.0e+00 mm | run 3 |" in mod.render(doc)


def test_readme_and_docs_say_faster_than_simpleitk_only_where_io_md_does():
    """No "uncompressed ... faster than SimpleITK" while io.md's uncompressed rows do not say so."""
    io_md = (RESULTS / "io.md").read_text()
    uncompressed = [line for line in io_md.splitlines() if line.startswith("| uncompressed |")]
    assert len(uncompressed) == 2
    supported = all("resunet faster in all" in line for line in uncompressed)
    for doc in (REPO / "README.md", REPO / "docs" / "io.md"):
        text = " ".join(doc.read_text().split())
        claims = re.findall(r"uncompressed[^.]{0,60}faster than SimpleITK", text)
        assert supported or not claims, (doc, claims)


def test_bench_predict_keeps_the_other_scripts_sections_and_predict_md_is_that_shape():
    """predict.md = bench_predict.py's own part + the marked sections of bench_ensemble.py and
    bench_memory_format.py, nothing hand-written between them; a rerun of bench_predict keeps them."""
    mod = bench_module("bench_predict")
    text = (RESULTS / "predict.md").read_text()
    kept = mod.marked_sections(text)
    assert [k.splitlines()[0] for k in kept] == ["<!-- ensemble -->", "<!-- memory-format -->"]
    own = text[: text.index("<!-- ensemble -->")].removesuffix("\n")
    assert own + "".join("\n" + k + "\n" for k in kept) == text
