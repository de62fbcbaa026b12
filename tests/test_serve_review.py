"""The review loop of ``resunet serve --require-review`` against a real Orthanc (issue 21 points 3-4).

A pacs-pull job of a service started with ``--require-review`` finishes in state ``review`` with no SEG
in Orthanc; a corrected mask on another grid is refused (422) and changes nothing; approving with a
corrected mask stores the corrected SEG (SEMIAUTOMATIC, ContentCreatorName the reviewer, a new series
that references the model's SEG) in the same study, its voxels equal to the corrected mask; a second
job rejected stores nothing and keeps the reason; the audit log has both decisions, its chain is
intact and ``resunet audit verify`` passes on the decision's folder. The tiny untrained model and no
TTA keep it fast; the voxels compared are the ones the reviewer drew.
"""

from __future__ import annotations

import time

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from orthanc_support import ORTHANC_AET, example_orthanc, series_of_modality
from serve_support import ServiceProcess, held_pacs_jobs
from test_app_support import EXAMPLE_DICOM, free_port, make_tiny_model

from resunet.cli import main
from resunet.io import load_study, read_dicom_seg, read_nifti
from resunet.reports.audit import read_runs, verify_log
from resunet.serve.tokens import TokenStore

pytestmark = pytest.mark.slow

REVIEWER = "dr.alice"
NODE_AET = "RESUNET"


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port):
    yield from example_orthanc(tmp_path_factory.mktemp("orthanc"), {"resunet": (NODE_AET, "127.0.0.1", node_port)})


def send_to_modality(orthanc, study_uid: str) -> None:
    """Orthanc's "send to modality" (its REST API) of the study to the modality named ``resunet`` (the node)."""
    import json
    import urllib.request

    lookup = urllib.request.Request(f"{orthanc.url}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(lookup, timeout=30) as r:
        orthanc_id = next(x["ID"] for x in json.loads(r.read()) if x["Type"] == "Study")
    req = urllib.request.Request(f"{orthanc.url}/modalities/resunet/store", data=orthanc_id.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200



def test_require_review_holds_until_approved_with_a_corrected_mask_and_reject_stores_nothing(orthanc, node_port, tmp_path):
    from resunet.pacs import PacsClient, PacsConfig

    study_uid = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    state, audit = tmp_path / "state", tmp_path / "audit.sqlite"
    state.mkdir(mode=0o700)
    tokens = TokenStore(state / "tokens.json")
    # an admin token: the DICOM node's jobs belong to no token, and submit tokens see only their own
    auth_token = tokens.add(REVIEWER, scope="admin")
    auth = {"Authorization": f"Bearer {auth_token}"}
    eve = {"Authorization": f"Bearer {tokens.add('eve')}"}
    model = make_tiny_model(tmp_path / "tiny.pt")
    before, before_rt = series_of_modality(orthanc, study_uid), series_of_modality(orthanc, study_uid, "RTSTRUCT")
    svc = ServiceProcess(state, model, "--no-tta", "--format", "nifti,seg,rtstruct", "--pacs", orthanc.dicomweb,
                         "--dicom-port", str(node_port), "--ae-title", NODE_AET, "--allow-aet", ORTHANC_AET,
                         "--store-to", f"127.0.0.1:{orthanc.port}:{ORTHANC_AET}", "--settle-seconds", "1",
                         "--require-review", audit_db=audit)
    with svc:
        held = held_pacs_jobs(svc, study_uid, 2, auth_token)
        jobs = [j["id"] for j in held]
        assert held[0]["review"]["state"] == "pending" and "stored_to_pacs" not in held[0]["result"]
        waiting = httpx.get(f"{svc.url}/v1/jobs", params={"state": "review"}, headers=auth, timeout=60).json()
        assert sorted(j["id"] for j in waiting["jobs"]) == sorted(jobs) and waiting["counts"]["review"] == 2
        assert series_of_modality(orthanc, study_uid) == before  # held: nothing sent

        # the reviewer corrects the model's mask: a block painted in, a slab erased
        mask_file = tmp_path / "model_mask.nii.gz"
        mask_file.write_bytes(httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}/outputs/mask", headers=auth, timeout=60).content)
        model_img = nib.load(mask_file)
        model_arr = np.asarray(model_img.dataobj).astype(np.uint8)
        fixed = model_arr.copy()
        fixed[10:30, 20:40, 5:15] = 1
        fixed[:, :, -3:] = 0
        assert not np.array_equal(fixed, model_arr)
        fixed_file = tmp_path / "corrected.nii.gz"
        nib.save(nib.Nifti1Image(fixed, model_img.affine), fixed_file)

        # a corrected mask on another grid: a clear 4xx, nothing decided
        other = tmp_path / "other_grid.nii.gz"
        nib.save(nib.Nifti1Image(fixed[:, :, :-1], model_img.affine), other)
        bad = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "approve"}, headers=auth,
                         files={"corrected": ("other_grid.nii.gz", other.read_bytes())}, timeout=120)
        assert bad.status_code == 422 and "other_grid.nii.gz is on another grid" in bad.json()["detail"], bad.text
        txt = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "approve"}, headers=auth,
                         files={"corrected": ("mask.txt", b"1 0 1")}, timeout=60)
        assert txt.status_code == 422 and "mask.txt: not a NIfTI file name" in txt.json()["detail"], txt.text
        hidden = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "approve"}, headers=eve, timeout=60)
        assert hidden.status_code == 404  # another submitter's job: not theirs to see or decide
        wrong = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "maybe"}, headers=auth, timeout=60)
        assert wrong.status_code == 422 and "approve, reject" in wrong.json()["detail"]
        assert httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}", headers=auth, timeout=60).json()["state"] == "review"
        assert series_of_modality(orthanc, study_uid) == before

        ok = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "approve", "comment": "fixed the base"},
                        files={"corrected": ("corrected.nii.gz", fixed_file.read_bytes())}, headers=auth, timeout=300)
        assert ok.status_code == 200, ok.text
        done = ok.json()
        assert done["state"] == "done" and done["review"]["state"] == "approved"
        assert done["review"]["reviewer"] == REVIEWER and done["review"]["corrected"] is True
        changed = int(np.count_nonzero((model_arr == 1) != (fixed == 1)))
        assert done["review"]["voxels_changed"] == {"brain": changed} and changed > 0
        record = httpx.get(done["review"]["outputs"]["record"]["url"], headers=auth, timeout=60)
        assert record.status_code == 200 and record.json()["review"]["reviewer"] == REVIEWER
        got_seg = httpx.get(done["review"]["outputs"]["seg"]["url"], headers=auth, timeout=60)
        assert got_seg.status_code == 200 and got_seg.headers["x-content-sha256"] == done["review"]["outputs"]["seg"]["sha256"]
        # how much the reviewer changed, in the decision's outputs (hashed by the audit record like the masks)
        csv_got = httpx.get(done["review"]["outputs"]["comparison"]["url"], headers=auth, timeout=60)
        assert csv_got.status_code == 200
        header, row = csv_got.text.strip().splitlines()
        got = dict(zip(header.split(","), row.split(",")))
        voxel_ml = float(np.prod(model_img.header.get_zooms()[:3])) / 1000.0
        a, b = model_arr == 1, fixed == 1
        assert got["name"] == "brain"
        assert float(got["model_ml"]) == pytest.approx(a.sum() * voxel_ml, abs=1e-3)
        assert float(got["corrected_ml"]) == pytest.approx(b.sum() * voxel_ml, abs=1e-3)
        assert float(got["dice"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-4)
        assert float(got["hd95_mm"]) > 0
        again = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "reject"}, headers=auth, timeout=60)
        assert again.status_code == 409 and "already approved" in again.json()["detail"]

        no = httpx.post(f"{svc.url}/v1/jobs/{jobs[1]}/review", data={"decision": "reject", "comment": "wrong series"},
                        headers=auth, timeout=120)
        assert no.status_code == 200, no.text
        assert no.json()["review"]["state"] == "rejected" and no.json()["review"]["comment"] == "wrong series"
        assert "sent" not in no.json()["review"]
        assert httpx.get(f"{svc.url}/v1/jobs", params={"state": "review"}, headers=auth, timeout=60).json()["jobs"] == []
        corrected_only = series_of_modality(orthanc, study_uid) - before
        assert len(corrected_only) == 1, corrected_only

        # the DICOM node: a series sent to it is held too; approved as it is, the model's SEG goes to --store-to
        send_to_modality(orthanc, study_uid)
        deadline, node_job = time.monotonic() + 300, None
        while time.monotonic() < deadline and node_job is None:
            listed = httpx.get(f"{svc.url}/v1/jobs", params={"state": "review"}, headers=auth, timeout=60).json()["jobs"]
            node_job = next((j for j in listed if j["kind"] == "dicom-series"), None)
            time.sleep(0.5)
        assert node_job is not None, svc.log()[-3000:]
        assert series_of_modality(orthanc, study_uid) - before == corrected_only  # held: nothing sent by the node
        as_is = httpx.post(f"{svc.url}/v1/jobs/{node_job['id']}/review", data={"decision": "approve"}, headers=auth,
                           timeout=300)
        assert as_is.status_code == 200, as_is.text
        sent = as_is.json()["review"]["sent"]
        assert sent["destination"].endswith(f":{ORTHANC_AET}")
        assert sorted(f.rsplit(".", 2)[-2] for f in sent["files"]) == ["rtstruct", "seg"]  # the model's own files
        assert as_is.json()["review"]["corrected"] is False and as_is.json()["review"]["voxels_changed"] == {"brain": 0}
    node_seg = pydicom.dcmread(next((state / "jobs" / node_job["id"] / "out").rglob("*.seg.dcm")), stop_before_pixels=True)
    assert series_of_modality(orthanc, study_uid) - before == corrected_only | {str(node_seg.SeriesInstanceUID)}  # the model's own SEG

    # Orthanc: the corrected SEG series in the same study
    new = corrected_only
    seg_file = PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study_uid, tmp_path / "got", sorted(new))[0]
    ds = pydicom.dcmread(seg_file)
    assert ds.StudyInstanceUID == study_uid and ds.Modality == "SEG"
    assert ds.ContentCreatorName.family_name == REVIEWER and str(ds.ContentCreatorName) == REVIEWER + "^"
    assert {str(s.SegmentAlgorithmType) for s in ds.SegmentSequence} == {"SEMIAUTOMATIC"}
    model_seg = pydicom.dcmread(next((state / "jobs" / jobs[0] / "out").rglob("*.seg.dcm")), stop_before_pixels=True)
    assert ds.SeriesInstanceUID != model_seg.SeriesInstanceUID
    referenced = {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
    assert str(model_seg.SeriesInstanceUID) in referenced  # the new series references the model's SEG
    source = load_study(EXAMPLE_DICOM)
    assert np.array_equal(np.asarray(read_dicom_seg(seg_file, source).array), fixed)
    assert np.array_equal(np.asarray(read_nifti(state / "jobs" / jobs[0] / "review" / "corrected.nii.gz").array), fixed)
    # and the corrected RTSTRUCT beside it (the job wrote one): SEMIAUTOMATIC, approved by the reviewer
    new_rt = series_of_modality(orthanc, study_uid, "RTSTRUCT") - before_rt
    assert len(new_rt) == 2  # the corrected one (pacs-pull job) and the model's (node job, approved as is)
    rts = [pydicom.dcmread(PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study_uid, tmp_path / uid, [uid])[0])
           for uid in sorted(new_rt)]
    corrected_rt = [d for d in rts if d.ApprovalStatus == "APPROVED"]
    assert len(corrected_rt) == 1 and corrected_rt[0].ReviewerName.family_name == REVIEWER
    assert {str(r.ROIGenerationAlgorithm) for r in corrected_rt[0].StructureSetROISequence} == {"SEMIAUTOMATIC"}

    # the audit log: both decisions, who and what, chain intact; audit verify passes on the decision's folder
    reviews = [r for r in read_runs(audit) if r["kind"] == "review"]
    assert [(r["run_id"], r["user"]) for r in reviews] == [(f"review-{jobs[0]}", REVIEWER), (f"review-{jobs[1]}", REVIEWER),
                                                           (f"review-{node_job['id']}", REVIEWER)]
    first, second, _ = (r["provenance"]["review"] for r in reviews)
    assert first["decision"] == "approve" and first["voxels_changed"] == {"brain": changed}
    assert first["input_sha256"] and first["model_mask_sha256"] and first["corrected_mask_sha256"]
    assert first["model_mask_sha256"] != first["corrected_mask_sha256"] and first["comment"] == "fixed the base"
    assert second["decision"] == "reject" and second["comment"] == "wrong series" and second["corrected_mask_sha256"] is None
    assert verify_log(audit) == []
    assert main(["audit", "verify", str(state / "jobs" / jobs[0] / "review"), "--audit-db", str(audit)]) == 0
