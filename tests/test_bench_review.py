"""bench/bench_review.py's designs (issue 21): which simulated acquisitions are corrections and which are held
out, the refusal to judge the goal without nilearn, and the seeded stream that keeps the held-out cases the
same whatever the design. The fine-tuning itself runs by hand (a minute on 2 cores); these checks are cheap.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_bench_results import RESULTS, bench_module

from resunet.io import read_nifti


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_review")


def test_both_designs_hold_out_the_same_six_cases_none_of_them_a_correction(bench):
    colin, mixed = bench.design("colin"), bench.design("colin,mni")
    assert colin[0] == [f"colin_t2_{i:02d}" for i in range(5)]
    assert mixed[0] == ["colin_t2_00", "colin_t2_01", "colin_t2_02", "mni_t2_02", "mni_t2_03"]
    assert colin[1] == mixed[1] == ["colin_t2_05", "colin_t2_06", "colin_t2_07", "colin_t2_08", "mni_t2_00", "mni_t2_01"]
    for corr, held in (colin, mixed):
        assert len(corr) == 5 and not set(corr) & set(held)


def test_colin_only_drops_the_other_head_and_refuses_mni_corrections(bench):
    corr, held = bench.design("colin", colin_only=True)
    assert held == ["colin_t2_05", "colin_t2_06", "colin_t2_07", "colin_t2_08"] and len(corr) == 5
    with pytest.raises(ValueError, match="--colin-only"):
        bench.design("colin,mni", colin_only=True)
    with pytest.raises(ValueError, match="one of"):
        bench.design("mni")


def test_without_nilearn_the_bench_stops_with_status_2_before_any_work(bench, tmp_path, monkeypatch, capsys):
    """nilearn made unimportable (None in sys.modules is how Python marks a module as missing)."""
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    assert bench.nilearn_missing()
    out = tmp_path / "r.md"
    for heads in ("colin", "colin,mni"):
        assert bench.main(["--out", str(out), "--work", str(tmp_path / "w"), "--corrected-heads", heads]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install -e '.[data]'" in err and "--colin-only" in err
    assert not out.exists() and not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as stop:  # --colin-only cannot be combined with MNI152 corrections
        bench.main(["--out", str(out), "--colin-only", "--corrected-heads", "colin,mni"])
    assert stop.value.code == 2


def test_make_cases_writes_only_the_named_cases_and_unused_draws_keep_the_stream(bench, tmp_path):
    """A design that leaves colin_t2_01..04 out still draws them: colin_t2_05 is the held-out case that
    bench/results/review.json measured (its grid), and only the two named cases are written."""
    corr, held = bench.make_cases(tmp_path, ["colin_t2_00"], ["colin_t2_05"])
    assert [c[0] for c in corr] == ["colin_t2_00"] and [c[0] for c in held] == ["colin_t2_05"]
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == [
        "colin_t2_00.nii.gz", "colin_t2_00_mask.nii.gz", "colin_t2_05.nii.gz", "colin_t2_05_mask.nii.gz"]
    committed = {r["case"]: r["grid"] for r in json.loads((RESULTS / "review.json").read_text())["rows"]}
    assert read_nifti(held[0][1]).describe_grid() == committed["colin_t2_05"]


def test_parent_contrast_cases_come_from_their_own_stream_and_match_the_committed_report(bench, tmp_path):
    """The T1 forgetting rows: drawn from PARENT_SEED (the T2-like cases stay as they were), only the named
    ones written, and colin_t1_01 has the grid bench/results/review.json reported (colin_t1_00 drawn first)."""
    cases = bench.make_parent_cases(tmp_path, ["colin_t1_01"])
    assert [c[0] for c in cases] == ["colin_t1_01"]
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == ["colin_t1_01.nii.gz", "colin_t1_01_mask.nii.gz"]
    committed = {r["case"]: r["grid"] for r in json.loads((RESULTS / "review.json").read_text())["parent_contrast_rows"]}
    assert read_nifti(cases[0][1]).describe_grid() == committed["colin_t1_01"]
    assert bench.PARENT_SEED != bench.SEED
