"""The service's SQLite job queue on a real database file: atomic claims, finish once, re-queue, tokens file."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from resunet.errors import ConfigError, ServerError
from resunet.serve.queue import JobQueue
from resunet.serve.tokens import TokenStore


def test_concurrent_workers_claim_every_job_exactly_once(tmp_path):
    db = tmp_path / "jobs.sqlite"
    q = JobQueue(db)
    ids = [q.enqueue("segment", input_name=f"case{i}", options={"formats": ["nifti"]}).id for i in range(40)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = JobQueue(db)  # its own connections, as another process would have
        while (job := mine.claim()) is not None:
            assert mine.finish(job, {"mask": {"path": "out/m.nii.gz", "sha256": job.id}})
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    assert q.counts() == {"queued": 0, "running": 0, "done": 40, "failed": 0}
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        done = conn.execute("SELECT job_id, COUNT(*) FROM events WHERE event = 'done' GROUP BY job_id").fetchall()
    assert sorted(done) == sorted((i, 1) for i in ids)
    assert [j.id for j in q.jobs()][::-1] == ids  # newest first


def test_stale_claim_cannot_finish_and_running_jobs_are_requeued(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite")
    a = q.enqueue("segment", input_name="a", submitted_by="alice")
    first = q.claim()
    assert first is not None and first.id == a.id and first.state == "running" and first.attempts == 1
    assert q.requeue_running() == [a.id]  # what a restarted service does
    assert q.get(a.id).state == "queued"
    second = q.claim()
    assert second.attempts == 2 and second.claim != first.claim
    assert not q.finish(first, {"mask": {"path": "x", "sha256": "0"}})  # the killed attempt's claim is stale
    assert not q.fail(first, "late failure")
    assert q.finish(second, {"mask": {"path": "out/a.nii.gz", "sha256": "ab"}}, {"volumes_ml": {"brain": 1.0}})
    assert not q.finish(second, {"mask": {"path": "out/a.nii.gz", "sha256": "ab"}})  # finished once
    done = q.get(a.id)
    assert done.state == "done" and done.outputs["mask"]["sha256"] == "ab" and done.result["volumes_ml"] == {"brain": 1.0}
    assert done.submitted_by == "alice" and done.claim is None
    events = [e["event"] for e in q.events(a.id)]
    assert events == ["queued", "claimed", "requeued", "claimed", "done"]
    assert q.claim() is None
    assert [j.id for j in q.unaudited()] == [a.id]
    q.mark_audited(a.id, "serve-" + a.id)
    assert q.unaudited() == []


def test_bad_queue_path_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot open the job database"):
        JobQueue(blocker / "jobs.sqlite")


def test_tokens_file_add_check_remove(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    t1 = store.add("pacs-gateway")
    t2 = store.add("ris")
    assert t1 != t2 and store.names() == ["pacs-gateway", "ris"]
    assert store.check(t1) == "pacs-gateway" and store.check(t2) == "ris"
    assert store.check(t1 + "x") is None and store.check("") is None
    text = (tmp_path / "tokens.json").read_text()
    assert t1 not in text and t2 not in text
    with pytest.raises(ConfigError, match="exists"):
        store.add("ris")
    with pytest.raises(ConfigError, match="token name"):
        store.add("bad name; drop table")
    store.remove("ris")
    assert store.check(t2) is None and store.names() == ["pacs-gateway"]
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(ServerError, match="unreadable tokens file"):
        store.check(t1)


def test_a_redone_segment_job_writes_the_same_seg_instance_and_another_job_a_new_one(tmp_path):
    """run_segmentation twice for one job (the redo after a kill) gives the same SEG/RTSTRUCT UIDs,
    so an archive that already got the first STOW keeps one copy; another job gets new UIDs."""
    import time

    import pydicom

    from resunet.inference import Predictor
    from resunet.serve.jobs import run_segmentation
    from resunet.serve.queue import Job
    from test_app_support import BUNDLED_MODEL, EXAMPLE_DICOM

    predictor = Predictor(BUNDLED_MODEL, device="cpu", tta=False)

    class Env:
        def job_dir(self, job_id: str):
            return tmp_path / "jobs" / job_id

        def predictor(self, uncertainty: bool = False):
            return predictor

        def default_formats(self):
            return ("seg", "rtstruct")

        def input_rules(self):
            return {"min_slices": 3, "allow_split_series": False}

    def uids(job_id: str) -> list[tuple[str, str]]:
        job = Job(id=job_id, kind="segment", state="running", submitted_by="test", input_name="study",
                  input_path=str(EXAMPLE_DICOM), input_sha256=None, options={}, created_at=time.time())
        outcome = run_segmentation(job, Env(), EXAMPLE_DICOM)
        out = []
        for key in ("seg", "rtstruct"):
            ds = pydicom.dcmread(tmp_path / "jobs" / job_id / outcome.outputs[key]["path"], stop_before_pixels=True)
            out.append((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
        return out

    first = uids("a" * 32)
    assert uids("a" * 32) == first  # redone: out/ is rebuilt, the objects are the same instances
    other = uids("b" * 32)
    assert all(o[0] != f[0] and o[1] != f[1] for o, f in zip(other, first))


def test_node_and_service_jobs_refuse_part_of_a_series_the_cli_reads_the_largest_stack(tmp_path):
    """Issue 22 point 7 on the job path the DICOM node uses (run_segmentation with the service's input
    rules): a series whose images disagree fails with the counts; `resunet predict` keeps reading the
    largest stack (documented CLI behaviour), and --allow-split-series gives the service that too."""
    import time

    import pydicom

    from resunet.errors import InputError
    from resunet.inference import Predictor
    from resunet.io import load_study
    from resunet.serve.jobs import run_segmentation
    from resunet.serve.queue import Job
    from test_app_support import EXAMPLE_DICOM, make_tiny_model

    series = tmp_path / "split"
    series.mkdir()
    for i, f in enumerate(sorted(EXAMPLE_DICOM.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        if i % 2:
            small = np.ascontiguousarray(ds.pixel_array[:64, :64])
            ds.Rows, ds.Columns = small.shape
            ds.PixelData = small.tobytes()
        ds.save_as(series / f.name, enforce_file_format=True)
    predictor = Predictor(make_tiny_model(tmp_path / "tiny.pt"), device="cpu", tta=False)

    class Env:
        def __init__(self, allow: bool) -> None:
            self.allow = allow

        def job_dir(self, job_id: str):
            return tmp_path / "jobs" / job_id

        def predictor(self, uncertainty: bool = False):
            return predictor

        def default_formats(self):
            return ("nifti",)

        def input_rules(self):
            return {"min_slices": 3, "allow_split_series": self.allow}

    def job(job_id: str) -> Job:
        return Job(id=job_id, kind="dicom-series", state="running", submitted_by="node", input_name="series",
                   input_path=str(series), input_sha256=None, options={}, created_at=time.time())

    with pytest.raises(InputError, match=r"its 91 images disagree .*\(46 of 91x109, 45 of 64x64\)"):
        run_segmentation(job("c" * 32), Env(False), series)
    outcome = run_segmentation(job("d" * 32), Env(True), series)
    assert outcome.result["grid"].startswith("shape (91, 109, 46)"), outcome.result["grid"]
    assert load_study(series).shape == (91, 109, 46)  # the CLI's reader: the largest stack, as before


def test_upload_check_decodes_no_volume(tmp_path):
    """Issue 22 point 1: the service checks an upload from its headers (a .nii.gz decompressed as a
    stream), so a 600^3 volume (216 MB of voxels, 210 KB gzipped) costs the request no volume's memory;
    reading it, as the check did before, raised the process's peak RSS by more than its size. Peak RSS
    memory is what tracemalloc saw allocated at once (numpy reports its arrays to it), in a fresh process."""
    import gzip
    import subprocess
    import sys

    import nibabel as nib

    raw = nib.Nifti1Image(np.zeros((600, 600, 600), np.uint8), np.eye(4)).to_bytes()
    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip.compress(raw, 9))
    code = f"""
import sys, tracemalloc
from pathlib import Path
from resunet.io.limits import Limits
from resunet.serve.service import Service
import resunet.io.loader, resunet.io.precheck, nibabel  # imports out of the measurement
tracemalloc.start()
rules = {{"limits": Limits(max_memory_gb=64), "min_slices": 3, "allow_split_series": False}}
if sys.argv[1] == "check":
    Service._check_study(Path({str(path)!r}), None, Path({str(tmp_path)!r}), "big.nii.gz", rules)
else:
    resunet.io.loader.load_study(Path({str(path)!r}), limits=rules["limits"])
print(tracemalloc.get_traced_memory()[1] / 2**20)
"""
    grew = {}
    for how in ("check", "read"):
        res = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        grew[how] = float(res.stdout.split()[-1])
    assert grew["read"] > 150, grew  # the measurement sees the decoded volume (206 MiB)
    assert grew["check"] < 20, grew  # the upload check decodes none (1 MiB gzip reads)


def test_erase_fails_a_queued_job_and_leaves_a_running_one(tmp_path):
    from resunet.serve.queue import JobQueue

    q = JobQueue(tmp_path / "jobs.sqlite")
    first = q.enqueue("segment", input_name="a", submitted_by="alice")
    second = q.enqueue("segment", input_name="b", submitted_by="alice")
    running = q.claim()
    assert running is not None and running.id == first.id
    assert q.erase(first.id, "alice") is False and q.get(first.id).state == "running"
    assert q.erase(second.id, "alice") is True
    job = q.get(second.id)
    assert job.state == "failed" and job.error == "deleted by alice before it ran" and job.purged_at is not None
    assert q.claim() is None  # no worker takes an erased job
    assert [e["event"] for e in q.events(second.id)][-1] == "erased"
