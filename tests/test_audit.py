"""Audit log (append-only SQLite with a hash chain) and `audit verify` on real report folders."""

from __future__ import annotations

import json
import sqlite3

import pytest

from resunet.cli import main
from resunet.errors import InputError
from resunet.reports import collect_provenance
from resunet.reports.audit import audit_db_path, read_runs, record_run, verify, verify_log
from resunet.reports.tables import write_json


@pytest.fixture
def report(tmp_path):
    """A folder with metrics.json listing an input file (absolute path) and an output (relative path)."""
    inp = tmp_path / "inputs" / "case1.nii.gz"
    inp.parent.mkdir()
    inp.write_bytes(b"input voxels")
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.csv").write_text("case,label,dice\ncase1,1,0.9\n")
    prov = collect_provenance(command=["resunet", "evaluate"], files={"prediction": [inp]})
    from resunet.reports.provenance import file_record

    rec = file_record(out / "metrics.csv")
    rec["path"] = "metrics.csv"
    write_json({"provenance": prov, "outputs": [rec]}, out / "metrics.json")
    db = tmp_path / "audit.sqlite"
    record_run("evaluate", prov, [out / "metrics.json", out / "metrics.csv"], db_path=db)
    return out, inp, db


def test_verify_ok_then_catches_modified_and_missing_files(report, capsys):
    out, inp, db = report
    res = verify(out, db_path=db)
    assert res.ok and len(res.checks) == 2
    assert main(["audit", "verify", str(out), "--audit-db", str(db)]) == 0
    assert "OK" in capsys.readouterr().out

    (out / "metrics.csv").write_text("case,label,dice\ncase1,1,0.99\n")  # someone "improves" a number
    res = verify(out, db_path=db)
    assert not res.ok and [c.path for c in res.changed] == [str(out / "metrics.csv")]
    inp.unlink()
    res = verify(out, db_path=db)
    assert [c.path for c in res.missing] == [str(inp.resolve())]
    assert main(["audit", "verify", str(out), "--audit-db", str(db)]) == 1
    text = capsys.readouterr().out
    assert "CHANGED" in text and "metrics.csv" in text and "MISSING" in text and "case1.nii.gz" in text


def test_verify_catches_edited_metrics_json_through_the_audit_log(report):
    out, _, db = report
    doc = json.loads((out / "metrics.json").read_text())
    doc["note"] = "edited"
    (out / "metrics.json").write_text(json.dumps(doc))
    res = verify(out, db_path=db)
    assert not res.ok and any("metrics.json" in p for p in res.problems)


def test_verify_bad_folder_is_input_error(tmp_path, capsys):
    with pytest.raises(InputError, match="metrics.json"):
        verify(tmp_path)
    assert main(["audit", "verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resunet audit: error:")


def test_audit_log_is_append_only_and_chained(tmp_path):
    db = tmp_path / "a.sqlite"
    for i in range(3):
        record_run("predict", collect_provenance(command=["resunet", "predict", str(i)]), [], db_path=db)
    runs = read_runs(db)
    assert [r["command"] for r in runs] == ["resunet predict 0", "resunet predict 1", "resunet predict 2"]
    assert verify_log(db) == []
    con = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("UPDATE runs SET kind = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM runs")
    # someone drops the triggers and rewrites history: the hash chain shows it
    con.execute("DROP TRIGGER runs_no_update")
    con.execute("UPDATE runs SET command = 'resunet predict 9' WHERE seq = 2")
    con.commit()
    con.close()
    problems = verify_log(db)
    assert len(problems) == 1 and "record 2" in problems[0]
    with pytest.raises(InputError, match="already|UNIQUE"):
        record_run("predict", runs[0]["provenance"], [], db_path=db)


def test_audit_db_path_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("RESUNET_AUDIT_DB", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert audit_db_path() == tmp_path / ".resunet" / "audit.sqlite"
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "env.sqlite"))
    assert audit_db_path() == tmp_path / "env.sqlite"
    assert audit_db_path(tmp_path / "opt.sqlite") == tmp_path / "opt.sqlite"
