"""resunet.inference.review and the queue's review states, on real files (no server; issue 21 point 3).

The example DICOM study (real pydicom files), a model SEG written by the project's writer, a
corrected mask written with nibabel: the corrected SEG says a person made it and references the
model's SEG, the checks refuse masks that do not fit, the decision lands in the audit log and
``resunet audit verify`` catches a corrected mask edited afterwards.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_app_support import EXAMPLE_DICOM

from resunet.cli import main
from resunet.errors import GeometryError, InputError
from resunet.inference.review import (Decision, check_decision, mask_sha256, read_correction, record_decision,
                                      voxels_changed, write_corrected)
from resunet.io import load_study, read_dicom_seg, read_rtstruct, write_dicom_seg, write_rtstruct
from resunet.reports.audit import read_runs, verify_log
from resunet.serve.queue import JobQueue

LABELS = {1: "brain"}


@pytest.fixture(scope="module")
def source():
    return load_study(EXAMPLE_DICOM)


@pytest.fixture(scope="module")
def model_mask(source):
    arr = np.zeros(source.shape, dtype=np.uint8)
    i, j, k = (s // 2 for s in source.shape)
    arr[i - 8:i + 8, j - 8:j + 8, max(k - 4, 0):k + 4] = 1
    return source.with_array(arr, is_label=True)


def _save(volume_like, arr, path):
    nib.save(nib.Nifti1Image(np.asarray(arr), volume_like.affine), path)
    return path


def test_read_correction_takes_only_label_maps_on_the_input_grid(source, model_mask, tmp_path):
    fixed = np.asarray(model_mask.array).copy()
    fixed[0:3, 0:3, 0:2] = 1
    got = read_correction(_save(model_mask, fixed, tmp_path / "ok.nii.gz"), model_mask, LABELS)
    assert got.same_grid(source) and np.array_equal(np.asarray(got.array), fixed)

    with pytest.raises(GeometryError, match="cropped.nii.gz is on another grid"):
        read_correction(_save(model_mask, fixed[:, :, :-1], tmp_path / "cropped.nii.gz"), model_mask, LABELS)
    shifted = model_mask.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(fixed, shifted), tmp_path / "shifted.nii.gz")
    with pytest.raises(GeometryError, match="another grid"):
        read_correction(tmp_path / "shifted.nii.gz", model_mask, LABELS)
    two = fixed.copy()
    two[5, 5, 1] = 2
    with pytest.raises(InputError, match=r"labels \[2\] that the model does not have \(1=brain\)"):
        read_correction(_save(model_mask, two, tmp_path / "two.nii.gz"), model_mask, LABELS)
    with pytest.raises(InputError, match="not a label map"):
        read_correction(_save(model_mask, fixed.astype(np.float32) * 0.5, tmp_path / "frac.nii.gz"), model_mask, LABELS)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="corrected mask junk.nii.gz") as err:
        read_correction(tmp_path / "junk.nii.gz", model_mask, LABELS)
    assert str(tmp_path) not in str(err.value)  # the client's name, never the server's path


def test_voxels_changed_counts_added_and_removed_per_label(model_mask):
    a = np.asarray(model_mask.array)
    b = a.copy()
    b[0:2, 0:2, 0:2] = 1  # 8 added
    on = np.argwhere(a == 1)[:5]
    b[tuple(on.T)] = 0  # 5 removed
    assert voxels_changed(model_mask, model_mask.with_array(b), {1: "brain"}) == {"brain": 13}
    assert voxels_changed(model_mask, model_mask, {1: "brain", 2: "lesion"}) == {"brain": 0, "lesion": 0}
    assert mask_sha256(model_mask) == mask_sha256(model_mask.with_array(a.astype(np.int16)))
    assert mask_sha256(model_mask) != mask_sha256(model_mask.with_array(b))
    assert check_decision(" Approve ", "x") == "approve"
    with pytest.raises(InputError, match="approve, reject"):
        check_decision("ok", "x")
    with pytest.raises(InputError, match="reviewer"):
        check_decision("reject", " ")


def test_corrected_seg_is_semiautomatic_by_the_reviewer_and_references_the_model_seg(source, model_mask, tmp_path):
    model_seg = write_dicom_seg(model_mask, source, tmp_path / "model.seg.dcm", LABELS, uid_seed="job 1")
    m = pydicom.dcmread(model_seg)
    assert {str(s.SegmentAlgorithmType) for s in m.SegmentSequence} == {"AUTOMATIC"} and str(m.ContentCreatorName) == ""
    fixed = np.asarray(model_mask.array).copy()
    fixed[0:4, 0:4, 0:3] = 1
    files = write_corrected(model_mask.with_array(fixed), source, tmp_path / "review", LABELS, reviewer="Dr^Alice",
                            model_seg=model_seg, uid_seed="review 1")
    ds = pydicom.dcmread(files["seg"])
    assert {str(s.SegmentAlgorithmType) for s in ds.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert str(ds.ContentCreatorName) == "Dr^Alice"  # given with components: kept as it is
    assert ds.SeriesInstanceUID != m.SeriesInstanceUID and ds.StudyInstanceUID == m.StudyInstanceUID
    refs = {str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedInstanceSequence}
            for s in ds.ReferencedSeriesSequence}
    assert str(m.SOPInstanceUID) in refs[str(m.SeriesInstanceUID)]  # the model's SEG instance
    assert str(source.meta["series_uid"]) in refs  # and the source images
    assert np.array_equal(np.asarray(read_dicom_seg(files["seg"], source).array), fixed)
    assert np.array_equal(np.asarray(nib.load(files["mask"]).dataobj), fixed)
    again = write_corrected(model_mask.with_array(fixed), source, tmp_path / "again", LABELS, reviewer="Dr^Alice",
                            model_seg=model_seg, uid_seed="review 1")
    assert pydicom.dcmread(again["seg"]).SOPInstanceUID == ds.SOPInstanceUID  # a redone decision: the same SEG


def test_corrected_rtstruct_is_semiautomatic_and_approved_by_the_reviewer(source, model_mask, tmp_path):
    m = pydicom.dcmread(write_rtstruct(model_mask, source, tmp_path / "model.rtstruct.dcm", LABELS, uid_seed="job 1"))
    assert m.ApprovalStatus == "UNAPPROVED" and {str(r.ROIGenerationAlgorithm) for r in m.StructureSetROISequence} == {"AUTOMATIC"}
    fixed = np.asarray(model_mask.array).copy()
    fixed[20:30, 20:30, 2:5] = 1
    files = write_corrected(model_mask.with_array(fixed), source, tmp_path / "review", LABELS, reviewer="Doe^Jane",
                            uid_seed="review 1", rtstruct=True, approved=True)
    ds = pydicom.dcmread(files["rtstruct"])
    assert {str(r.ROIGenerationAlgorithm) for r in ds.StructureSetROISequence} == {"SEMIAUTOMATIC"}
    assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == "Doe^Jane" and ds.ReviewDate
    assert {str(o.ROIInterpreter) for o in ds.RTROIObservationsSequence} == {"Doe^Jane"}
    assert ds.SeriesInstanceUID != m.SeriesInstanceUID and ds.StudyInstanceUID == m.StudyInstanceUID
    assert np.array_equal(np.asarray(read_rtstruct(files["rtstruct"], source).array), fixed)
    rejected = write_corrected(model_mask.with_array(fixed), source, tmp_path / "rejected", LABELS, reviewer="Doe^Jane",
                               rtstruct=True, approved=False)
    assert pydicom.dcmread(rejected["rtstruct"]).ApprovalStatus == "UNAPPROVED"


def test_a_decision_is_one_audit_record_and_audit_verify_catches_an_edited_mask(source, model_mask, tmp_path, capsys):
    fixed = np.asarray(model_mask.array).copy()
    fixed[0:4, 0:4, 0:3] = 1
    folder = tmp_path / "review"
    files = write_corrected(model_mask.with_array(fixed), source, folder, LABELS, reviewer="alice")
    assert str(pydicom.dcmread(files["seg"]).ContentCreatorName) == "alice^"  # one name: the family name
    audit = tmp_path / "audit.sqlite"
    d = Decision(subject="job7", decision="approve", reviewer="alice", comment="ok", input_sha256="ab" * 32,
                 model_mask_sha256=mask_sha256(model_mask), corrected_mask_sha256=mask_sha256(model_mask.with_array(fixed)),
                 voxels_changed=voxels_changed(model_mask, model_mask.with_array(fixed), LABELS))
    target = record_decision(d, folder, {"command": ["test"]}, db_path=audit, files=files)
    doc = json.loads(target.read_text())
    assert doc["review"]["decision"] == "approve" and doc["provenance"]["run_id"] == "review-job7"
    runs = read_runs(audit)
    assert [(r["kind"], r["run_id"], r["user"]) for r in runs] == [("review", "review-job7", "alice")]
    assert runs[0]["provenance"]["review"]["voxels_changed"] == {"brain": 48}
    assert verify_log(audit) == []
    assert main(["audit", "verify", str(folder), "--audit-db", str(audit)]) == 0
    with pytest.raises(InputError, match="review-job7"):  # once per subject
        record_decision(d, tmp_path / "twice", {"command": ["test"]}, db_path=audit, files={})
    fixed[10, 10, 1] = 1  # someone edits the approved mask afterwards
    _save(model_mask, fixed, files["mask"])
    capsys.readouterr()
    assert main(["audit", "verify", str(folder), "--audit-db", str(audit)]) == 1
    assert "CHANGED" in capsys.readouterr().out


def test_queue_holds_a_job_for_review_until_one_decision(tmp_path):
    q = JobQueue(tmp_path / "jobs.sqlite")
    held = q.enqueue("pacs-pull", options={"require_review": True})
    plain = q.enqueue("pacs-pull")
    for want in (held, plain):
        job = q.claim()
        assert job is not None and job.id == want.id
        q.finish(job, {}, {}, **({"review": {"state": "pending", "send": None}} if want is held else {}))
    assert [j.id for j in q.jobs("review")] == [held.id]
    assert q.get(plain.id).review_state is None and q.get(held.id).review_state == "pending"
    assert [j.id for j in q.finished_before(1e12)] == [plain.id]  # retention keeps what waits for a person
    assert q.decide(held.id, {"state": "rejected", "reviewer": "bob", "comment": "no"})
    assert not q.decide(held.id, {"state": "approved", "reviewer": "eve"})  # once
    assert not q.decide(plain.id, {"state": "approved", "reviewer": "eve"})  # never held
    assert q.get(held.id).review == {"state": "rejected", "reviewer": "bob", "comment": "no"}
    assert q.jobs("review") == [] and {j.id for j in q.finished_before(1e12)} == {plain.id, held.id}
    assert [e["detail"] for e in q.events(held.id) if e["event"] == "review"] == ["pending", "rejected by bob"]


def test_corrected_seg_and_rtstruct_are_clean_for_dciodvfy_and_agree_with_the_study(source, model_mask, tmp_path):
    """dicom3tools: the corrected objects are valid IODs (0 errors, no unexplained warning) and agree with
    the source images and the model's SEG on every patient/study attribute."""
    from dicom_checks import assert_dciodvfy_clean, assert_study_consistent

    model_seg = write_dicom_seg(model_mask, source, tmp_path / "model.seg.dcm", LABELS, uid_seed="job 1")
    fixed = np.asarray(model_mask.array).copy()
    fixed[20:30, 20:30, 2:5] = 1
    files = write_corrected(model_mask.with_array(fixed), source, tmp_path / "review", LABELS, reviewer="dr.alice",
                            model_seg=model_seg, uid_seed="review 1", rtstruct=True, approved=True)
    assert_dciodvfy_clean([files["seg"], files["rtstruct"]])
    assert_study_consistent([*sorted(EXAMPLE_DICOM.glob("*.dcm"))[:3], model_seg, files["seg"], files["rtstruct"]])


def test_require_review_is_refused_with_a_shared_queue_and_is_off_by_default(tmp_path):
    from resunet.errors import ConfigError
    from resunet.serve.config import ServeConfig

    assert ServeConfig(state_dir=tmp_path).require_review is False  # without the flag: as before
    with pytest.raises(ConfigError, match="--require-review works with the SQLite queue"):
        ServeConfig(state_dir=tmp_path, require_review=True, queue_url="postgresql://resunet@127.0.0.1:5432/resunet")
