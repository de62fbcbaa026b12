"""The predictions record store (resunet.inference.records) and the one file-name sanitiser (resunet.io.names)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from resunet.inference.cases import Case
from resunet.inference.records import (JOURNAL, SCHEMA, SUMMARY, RecordStore, case_record, journal_name,
                                       merge_summaries, read_records, summary_name)
from resunet.inference.validate import write_refused_summary
from resunet.io.names import safe_name

HEADER = {"model": {"name": "m", "sha256": "ab" * 32}, "settings": {}, "provenance": {"run_id": "run-1"}}


def _record(case: str, status: str = "ok", finished: str = "2026-12-07T01:00:00Z") -> dict:
    rec = case_record(case, {"path": f"/in/{case}.nii.gz", "kind": "nifti"}, device="cpu",
                      model={"name": "m", "sha256": "ab" * 32}, run_id="run-1")
    rec.update(status=status, finished_utc=finished, volumes_ml={"brain": 1.5} if status == "ok" else None)
    if status != "ok":
        rec["reason"] = f"{case}: unreadable"
    return rec


def test_store_journals_every_record_and_keeps_earlier_cases_in_the_summary(tmp_path):
    out = tmp_path / "out"
    with RecordStore(out, HEADER) as first:
        first.add(_record("a"))
        first.add(_record("b", "failed"))
    assert first.finish() == out / SUMMARY
    lines = (out / JOURNAL).read_text().splitlines()
    assert [json.loads(x)["case"] for x in lines] == ["a", "b"]  # one fsynced line per case, in order

    (out / JOURNAL).write_text((out / JOURNAL).read_text() + '{"case": "cut", "sta')  # a kill mid-line
    previous = read_records(out)
    assert set(previous) == {"a", "b"}
    with RecordStore(out, HEADER, previous=previous) as again:  # redo b only
        again.add(_record("b", "ok", finished="2026-12-07T02:00:00Z"))
    doc = json.loads(again.finish().read_text())
    assert doc["schema"] == SCHEMA and doc["counts"] == {"cases": 2, "ok": 2, "failed": 0}
    assert [r["case"] for r in doc["cases"]] == ["a", "b"]  # a kept from the earlier run, sorted
    assert json.loads((out / JOURNAL).read_text().splitlines()[-1])["case"] == "b"  # cut line terminated
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b"] and rows[0]["volume_ml:brain"] == "1.5"


def test_shards_write_their_own_files_and_the_last_merges(tmp_path):
    assert journal_name((1, 2)) == "predictions.shard-1-of-2.jsonl" and summary_name((0, 1)) == SUMMARY
    for i, case in enumerate(["a", "b"]):
        with RecordStore(tmp_path, HEADER, shard=(i, 2), previous={"old": _record("old")}) as store:
            store.add(_record(case))
        own = json.loads(store.save().read_text())
        assert [r["case"] for r in own["cases"]] == [case]  # a shard's summary: its own cases only
        path = store.finish()
    assert path == tmp_path / SUMMARY
    merged = json.loads(path.read_text())
    assert [r["case"] for r in merged["cases"]] == ["a", "b"] and "run-1" in merged["runs"]
    assert json.loads(merge_summaries(tmp_path).read_text())["counts"]["cases"] == 2


def test_refused_cases_go_through_the_store(tmp_path):
    out = tmp_path / "out"
    with RecordStore(out, HEADER) as store:
        store.add(_record("earlier"))
    store.finish()
    cases = [Case("x", tmp_path / "x.nii.gz", "nifti"), Case("y", tmp_path / "y", "dicom")]
    path = write_refused_summary(cases, {"x": "x.nii.gz: truncated"}, out, tmp_path / "missing.pt")
    doc = json.loads(path.read_text())
    assert doc["model"]["loaded"] is False and doc["counts"] == {"cases": 2, "ok": 1, "failed": 1}
    rec = next(r for r in doc["cases"] if r["case"] == "x")
    assert rec["reason"] == "x.nii.gz: truncated" and rec["seconds"] == 0.0 and rec["outputs"] == {}
    assert json.loads((out / JOURNAL).read_text().splitlines()[-1])["case"] == "x"
    sharded = write_refused_summary(cases, {"y": "y: no images"}, out, tmp_path / "missing.pt", shard=(1, 2))
    assert sharded.name == "predictions.shard-1-of-2.json"
    assert [r["case"] for r in json.loads(sharded.read_text())["cases"]] == ["y"]


def test_one_sanitiser_for_uids_case_ids_and_label_names(tmp_path):
    assert safe_name("1.2.840.10008.5.1") == "1.2.840.10008.5.1"
    assert safe_name("../../etc/passwd") == ".._.._etc_passwd"
    assert safe_name("..") == "__" and safe_name(".") == "_"  # never a name that climbs out of its folder
    assert safe_name("") == "unknown" and safe_name("", "study") == "study"
    assert safe_name("grey matter.v2", dots=False) == "grey_matter_v2"
    for hostile in ("..", "a/b", "x\\y", "$(rm)", "\x00", "é.1"):
        name = safe_name(hostile)
        target = (tmp_path / name).resolve()
        assert target.parent == tmp_path.resolve() and "/" not in name
