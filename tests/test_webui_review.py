"""The web page's "To review" list against a real ``resunet serve --require-review`` and a real Orthanc (issue 21 point 4).

The service (the bundled brain_extraction model, TTA off) pulls the example study from Orthanc three
times and holds the results; the page (Streamlit's AppTest, the real page script, a named-user login) lists
them with its admin token, opens one (its input and the model's mask through the viewer), approves it
as the signed-in user: the model's SEG is in Orthanc under the same study and the audit log has the
decision with the page user's name (the token's name beside it). Rejecting without a reason is refused
on the page; with one, nothing is stored and the reason is kept. A corrected mask handed to the page
(what the mask editor will do) is approved as the correction: the SEMIAUTOMATIC SEG made by the page
user, its voxels the corrected ones, is in the study. A service that is down is a clear
on-page message, and a submit token cannot decide for another person (403).
"""

from __future__ import annotations

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from orthanc_support import example_orthanc, series_of_modality
from serve_support import ServiceProcess, held_pacs_jobs
from streamlit.testing.v1 import AppTest
from test_app_support import APP_SCRIPT, BUNDLED_MODEL, EXAMPLE_DICOM, make_tiny_model

from resunet.reports.audit import read_runs, verify_log
from resunet.serve.tokens import TokenStore
from resunet.webui.auth import hash_password

pytestmark = pytest.mark.slow

PAGE_USER = "dr.bob"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from example_orthanc(tmp_path_factory.mktemp("orthanc"))



def _page(tmp_path, monkeypatch, service_url: str, token: str) -> AppTest:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    make_tiny_model(models / "tiny.pt")  # the page's own model picker: a light one
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(models))
    monkeypatch.setenv("RESUNET_APP_DEFAULT_MODEL", "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("RESUNET_APP_SERVICE_URL", service_url)
    monkeypatch.setenv("RESUNET_SERVICE_TOKEN", token)
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=300)
    at.secrets["resunet"] = {"users": {PAGE_USER: hash_password("pw", iterations=1000)}}
    at.run()
    at.text_input[0].input(PAGE_USER)
    at.text_input[1].input("pw")
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def _texts(elements) -> list[str]:
    return [e.value for e in elements]


def _approve(at, job_id: str, comment: str) -> str:
    """Approve ``job_id`` on the page with ``comment``; the page's one success line for it (no error shown)."""
    at.text_input(key=f"review_comment_{job_id}").input(comment)
    at.button(key="review_job_approve").click().run()
    assert not at.exception, at.exception
    assert _texts(at.error) == []
    (ok,) = [s for s in _texts(at.success) if s.startswith(f"Job {job_id}")]
    return ok


def test_to_review_list_approve_sends_the_seg_and_reject_stores_nothing(orthanc, tmp_path, monkeypatch):
    study_uid = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    state, audit = tmp_path / "state", tmp_path / "audit.sqlite"
    state.mkdir(mode=0o700)
    tokens = TokenStore(state / "tokens.json")
    page_token = tokens.add("webui", scope="admin", group="ward")
    submit_token = tokens.add("eve", group="ward")  # sees the ward's jobs, may decide only as herself
    auth = {"Authorization": f"Bearer {page_token}"}
    before = series_of_modality(orthanc, study_uid)
    svc = ServiceProcess(state, BUNDLED_MODEL, "--no-tta", "--format", "nifti,seg", "--pacs", orthanc.dicomweb,
                         "--require-review", audit_db=audit)
    with svc:
        held = held_pacs_jobs(svc, study_uid, 3, page_token)
        jobs = [j["id"] for j in held]

        # the display files: the input and the model's mask on one grid, the mask = the job's own NIfTI mask
        img = httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}/review/display/image", headers=auth, timeout=120)
        assert img.status_code == 200, img.text
        bad_key = httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}/review/display/probabilities", headers=auth, timeout=60)
        assert bad_key.status_code == 404 and "image, mask" in bad_key.json()["detail"]
        # a submit token may not decide for another person
        eve = httpx.post(f"{svc.url}/v1/jobs/{jobs[0]}/review", data={"decision": "approve", "reviewer": "dr.mallory"},
                         headers={"Authorization": f"Bearer {submit_token}"}, timeout=60)
        assert eve.status_code == 403 and "only an admin token" in eve.json()["detail"], eve.text

        at = _page(tmp_path, monkeypatch, svc.url, page_token)
        assert _texts(at.error) == []
        table = next(df.value for df in at.dataframe if "Job" in df.value.columns)
        assert sorted(table["Job"]) == sorted(jobs)  # the three held jobs, nothing else
        assert set(table["Model"]) == {held[0]["result"]["model"]["name"]}
        assert all(table["Finished (UTC)"]) and study_uid not in " ".join(map(str, table.values.ravel()))

        # open the first job: its input with the model's mask in three views
        at.selectbox(key="review_job").set_value(jobs[0]).run()
        at.button(key="review_open").click().run()
        assert not at.exception, at.exception
        assert _texts(at.error) == []
        captions = [i.proto.imgs[0].caption for i in at.get("image")]
        assert [c.split(" · ")[0] for c in captions] == [f"job {jobs[0]}"] * 3
        _, image, mask = at.session_state["review_opened"]
        model_mask = np.asarray(mask.array)
        assert image.shape == mask.shape == (91, 109, 91) and 0 < np.count_nonzero(model_mask) < model_mask.size
        job_mask = tmp_path / "job_mask.nii.gz"
        job_mask.write_bytes(httpx.get(held[0]["outputs"]["mask"]["url"], headers=auth, timeout=60).content)
        assert np.array_equal(model_mask, np.asarray(nib.load(job_mask).dataobj))
        assert series_of_modality(orthanc, study_uid) == before  # held: nothing sent yet

        ok = _approve(at, jobs[0], "looks right")
        assert f"Approved by {PAGE_USER}" in ok and orthanc.dicomweb in ok and "seg" in ok, ok
        new = series_of_modality(orthanc, study_uid) - before
        assert len(new) == 1  # the model's SEG, in the same study

        # reject the second: a reason is required
        at.selectbox(key="review_job").set_value(jobs[1]).run()
        at.button(key="review_open").click().run()
        at.button(key="review_job_reject").click().run()
        assert any("A rejection needs a reason" in e for e in _texts(at.error))
        assert httpx.get(f"{svc.url}/v1/jobs/{jobs[1]}", headers=auth, timeout=60).json()["state"] == "review"
        at.text_input(key=f"review_comment_{jobs[1]}").input("motion artefact")
        at.button(key="review_job_reject").click().run()
        assert not at.exception, at.exception
        (no,) = [s for s in _texts(at.info) if s.startswith(f"Job {jobs[1]}")]
        assert f"Rejected by {PAGE_USER}: motion artefact" in no and "Nothing was sent" in no
        assert series_of_modality(orthanc, study_uid) - before == new  # reject stored nothing

        # the third with a correction (what the mask editor hands over): the corrected SEG goes to Orthanc
        from resunet.webui.review_queue import CORRECTIONS

        at.selectbox(key="review_job").set_value(jobs[2]).run()
        at.button(key="review_open").click().run()
        _, _image, mask2 = at.session_state["review_opened"]
        fixed = np.asarray(mask2.array).copy()
        fixed[0:10, 0:10, 40:50] = 1  # painted outside the head
        fixed[40:50, 50:60, 40:50] = 0  # erased inside the brain
        assert not np.array_equal(fixed, np.asarray(mask2.array))
        at.session_state[CORRECTIONS] = {jobs[2]: mask2.with_array(fixed)}
        at.run()
        assert any("Approve sends your corrected mask" in c for c in _texts(at.caption))
        at.button(key="review_job_approve").click().run()
        assert not at.exception, at.exception
        assert _texts(at.error) == []
        (ok3,) = [s for s in _texts(at.success) if s.startswith(f"Job {jobs[2]}")]
        assert f"Approved by {PAGE_USER}: the corrected seg" in ok3, ok3
        assert any("No results wait for a review" in s for s in _texts(at.info))
        corrected_seg = series_of_modality(orthanc, study_uid) - before - new
        assert len(corrected_seg) == 1
        after = httpx.get(f"{svc.url}/v1/jobs/{jobs[1]}", headers=auth, timeout=60).json()
        assert after["review"]["state"] == "rejected" and after["review"]["comment"] == "motion artefact"
        assert after["review"]["reviewer"] == PAGE_USER and after["review"]["via"] == "webui"
        approved = httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}", headers=auth, timeout=60).json()["review"]
        assert approved["state"] == "approved" and approved["reviewer"] == PAGE_USER and approved["sent"]["study_uid"] == study_uid

    assert page_token not in svc.log() and submit_token not in svc.log()
    # the SEG in Orthanc is the model's SEG of the approved job
    model_seg = pydicom.dcmread(next((state / "jobs" / jobs[0] / "out").rglob("*.seg.dcm")), stop_before_pixels=True)
    assert new == {str(model_seg.SeriesInstanceUID)} and model_seg.StudyInstanceUID == study_uid
    # the audit log: the three decisions with the page user's name, the token beside it, chain intact
    reviews = [r for r in read_runs(audit) if r["kind"] == "review"]
    assert [(r["run_id"], r["user"]) for r in reviews] == [(f"review-{j}", PAGE_USER) for j in jobs]
    first, second, third = (r["provenance"] for r in reviews)
    assert first["review"]["decision"] == "approve" and first["review"]["comment"] == "looks right"
    assert first["job"]["decided_via"] == "webui"
    assert second["review"]["decision"] == "reject" and second["review"]["comment"] == "motion artefact"
    assert third["review"]["corrected_mask_sha256"] and third["review"]["voxels_changed"]["brain"] > 0
    assert verify_log(audit) == []
    # the corrected SEG in Orthanc: same study, SEMIAUTOMATIC, made by the page user, the corrected voxels
    from resunet.io import load_study, read_dicom_seg
    from resunet.pacs import PacsClient, PacsConfig

    seg_file = PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study_uid, tmp_path / "got", sorted(corrected_seg))[0]
    ds = pydicom.dcmread(seg_file)
    assert ds.StudyInstanceUID == study_uid and ds.ContentCreatorName.family_name == PAGE_USER
    assert {str(x.SegmentAlgorithmType) for x in ds.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert np.array_equal(np.asarray(read_dicom_seg(seg_file, load_study(EXAMPLE_DICOM)).array), fixed)

    # the service gone: the list says so on the page, no traceback
    at.button(key="review_refresh").click().run()
    assert not at.exception, at.exception
    (down,) = _texts(at.error)
    assert f"the review service at {svc.url} cannot be reached" in down and page_token not in down


def test_service_url_must_be_http(tmp_path):
    from resunet.errors import ConfigError
    from resunet.webui.config import AppConfig
    from resunet.webui.review_queue import service_token

    with pytest.raises(ConfigError, match="service_url must start with http"):
        AppConfig(service_url="localhost:8000")
    assert AppConfig(service_url="http://127.0.0.1:8000/").service_url == "http://127.0.0.1:8000"
    assert service_token({"resunet": {"service_token": "abc"}}, env={}) == "abc"
    assert service_token({"resunet": {"service_token": "abc"}}, env={"RESUNET_SERVICE_TOKEN": "env"}) == "env"
    assert service_token({}, env={}) is None


def _canvas_stroke(at: AppTest, view: str, seq: int, fractions: list[tuple[float, float]]) -> None:
    """A stroke as the canvas component sends it (its value under its key), in the editor's screen pixels."""
    ed = at.session_state["review_edit_state"]["editor"]
    w, h = ed.image_size(view)
    at.session_state[f"review_edit_canvas_{view}"] = {"seq": seq, "kind": "stroke",
                                                       "points": [[w * fx, h * fy] for fx, fy in fractions]}


def test_a_held_job_edited_in_the_page_editor_is_approved_as_the_corrected_seg(orthanc, tmp_path, monkeypatch):
    """From "To review": open a job, edit its mask with the page's edit panel (paint on two axial slices,
    interpolate between them, erase, undo/redo), see the comparison, approve: the service's corrected mask,
    the SEMIAUTOMATIC SEG in Orthanc and the audit record hold exactly the edited voxels. A second job,
    edited then rejected, sends nothing and keeps the reason."""
    from resunet.evaluation import evaluate_case
    from resunet.inference.review import mask_sha256
    from resunet.io.hashing import sha256_file
    from resunet.io import load_study, read_dicom_seg, read_nifti
    from resunet.pacs import PacsClient, PacsConfig

    study_uid = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    state, audit = tmp_path / "state", tmp_path / "audit.sqlite"
    state.mkdir(mode=0o700)
    page_token = TokenStore(state / "tokens.json").add("webui", scope="admin")
    auth = {"Authorization": f"Bearer {page_token}"}
    before = series_of_modality(orthanc, study_uid)
    service_model = make_tiny_model(tmp_path / "service-tiny.pt", seed=3)  # a real model run, seconds on 2 CPUs
    svc = ServiceProcess(state, service_model, "--no-tta", "--format", "nifti,seg", "--pacs", orthanc.dicomweb,
                         "--require-review", audit_db=audit)
    with svc:
        held = held_pacs_jobs(svc, study_uid, 2, page_token)
        jobs = [j["id"] for j in held]

        at = _page(tmp_path, monkeypatch, svc.url, page_token)
        at.selectbox(key="review_job").set_value(jobs[0]).run()
        at.button(key="review_open").click().run()
        assert not at.exception, at.exception
        _, image, model = at.session_state["review_opened"]
        model_arr = np.asarray(model.array).copy()
        # a local study segmented on the same page: both sign-off panels at once, their widgets apart
        at.button(key="example").click().run()
        assert not at.exception, at.exception
        assert {"review_approve", "review_job_approve"} <= {b.key for b in at.button}
        at.toggle(key="review_edit_mode").set_value(True).run()
        assert not at.exception, at.exception
        ed = at.session_state["review_edit_state"]["editor"]
        assert ed.voxels_changed() == 0 and at.selectbox(key="review_edit_label").options == ["1: brain"]
        # paint a bar on axial slices 20 and 30, then fill 21..29 by interpolation
        at.radio(key="review_edit_tool").set_value("paint").run()
        at.number_input(key="review_edit_radius").set_value(4.0).run()
        at.slider(key="review_edit_slice_axial").set_value(20).run()
        _canvas_stroke(at, "axial", 1, [(0.1, 0.1), (0.4, 0.12)])
        at.run()
        at.slider(key="review_edit_slice_axial").set_value(30).run()
        _canvas_stroke(at, "axial", 2, [(0.1, 0.1), (0.4, 0.12)])
        at.run()
        assert ed.edited_slices("axial", 1) == [19, 29]
        painted_two = ed.voxels_changed()
        at.button(key="review_edit_interp").click().run()
        assert not at.exception, at.exception
        assert ed.voxels_changed() > painted_two
        # erase a stroke through the middle, undo it, redo it: the same mask as after the erase
        at.radio(key="review_edit_tool").set_value("erase").run()
        at.slider(key="review_edit_slice_axial").set_value(46).run()
        _canvas_stroke(at, "axial", 3, [(0.3, 0.5), (0.7, 0.5)])
        at.run()
        erased = np.asarray(ed.corrected.array).copy()
        at.button(key="review_edit_undo").click().run()
        assert not np.array_equal(np.asarray(ed.corrected.array), erased)
        at.button(key="review_edit_redo").click().run()
        assert not at.exception, at.exception
        fixed = np.asarray(ed.corrected.array).copy()
        assert np.array_equal(fixed, erased) and not np.array_equal(fixed, model_arr)
        assert (fixed != model_arr).any(axis=(0, 1)).sum() >= 11  # the interpolated slices changed too
        # the comparison beside the editor: the evaluation package's numbers, model vs corrected
        shown = [df.value for df in at.dataframe if "corrected_ml" in df.value.columns][0]
        expected = evaluate_case(model, ed.corrected, labels=[1])[0]
        assert float(shown["dice"][0]) == pytest.approx(expected["dice"], abs=1e-4) and expected["dice"] < 1.0
        assert float(shown["model_ml"][0]) == pytest.approx(expected["vol_pred_ml"], abs=1e-3)
        assert float(shown["corrected_ml"][0]) == pytest.approx(expected["vol_gt_ml"], abs=1e-3)
        assert any("Approve sends your corrected mask" in c for c in _texts(at.caption))
        assert series_of_modality(orthanc, study_uid) == before  # held: nothing sent yet

        ok = _approve(at, jobs[0], "frontal bar added")
        assert f"Approved by {PAGE_USER}: the corrected seg" in ok, ok
        corrected_seg = series_of_modality(orthanc, study_uid) - before
        assert len(corrected_seg) == 1

        # the second job: edited, then rejected with a reason: nothing sent, the reason kept
        at.selectbox(key="review_job").set_value(jobs[1]).run()
        at.button(key="review_open").click().run()
        assert at.session_state["review_edit_state"]["editor"].voxels_changed() == 0  # a fresh editor
        at.toggle(key="review_edit_mode").set_value(True).run()
        at.radio(key="review_edit_tool").set_value("paint").run()
        _canvas_stroke(at, "axial", 1, [(0.2, 0.2), (0.6, 0.2)])
        at.run()
        assert at.session_state["review_edit_state"]["editor"].voxels_changed() > 0
        at.text_input(key=f"review_comment_{jobs[1]}").input("wrong series")
        at.button(key="review_job_reject").click().run()
        assert not at.exception, at.exception
        (no,) = [s for s in _texts(at.info) if s.startswith(f"Job {jobs[1]}")]
        assert f"Rejected by {PAGE_USER}: wrong series" in no
        assert series_of_modality(orthanc, study_uid) - before == corrected_seg  # reject stored nothing
        first = httpx.get(f"{svc.url}/v1/jobs/{jobs[0]}", headers=auth, timeout=60).json()["review"]
        second = httpx.get(f"{svc.url}/v1/jobs/{jobs[1]}", headers=auth, timeout=60).json()["review"]
    assert first["state"] == "approved" and first["corrected"] and first["reviewer"] == PAGE_USER
    assert second["state"] == "rejected" and not second["corrected"] and second["comment"] == "wrong series"
    assert "sent" not in second
    # the service's corrected mask: exactly the page's edits
    saved = read_nifti(state / "jobs" / jobs[0] / "review" / "corrected.nii.gz")
    assert first["outputs"]["mask"]["sha256"] == sha256_file(state / "jobs" / jobs[0] / "review" / "corrected.nii.gz")
    assert np.array_equal(np.asarray(saved.array), fixed)
    # the SEG in Orthanc: same study, SEMIAUTOMATIC, the page user as its creator, the edited voxels
    seg_file = PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study_uid, tmp_path / "got", sorted(corrected_seg))[0]
    ds = pydicom.dcmread(seg_file)
    assert ds.StudyInstanceUID == study_uid and ds.ContentCreatorName.family_name == PAGE_USER
    assert {str(x.SegmentAlgorithmType) for x in ds.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert np.array_equal(np.asarray(read_dicom_seg(seg_file, load_study(EXAMPLE_DICOM)).array), fixed)
    # the audit log: both decisions by the page user; the approval hashes the edited mask
    reviews = {r["run_id"]: r for r in read_runs(audit) if r["kind"] == "review"}
    approve = reviews[f"review-{jobs[0]}"]["provenance"]["review"]
    reject = reviews[f"review-{jobs[1]}"]["provenance"]["review"]
    assert reviews[f"review-{jobs[0]}"]["user"] == PAGE_USER == reviews[f"review-{jobs[1]}"]["user"]
    assert approve["decision"] == "approve" and approve["corrected_mask_sha256"] == mask_sha256(model.with_array(fixed))
    assert approve["voxels_changed"]["brain"] == int(np.count_nonzero(fixed != model_arr))
    assert reject["decision"] == "reject" and reject["corrected_mask_sha256"] is None
    assert verify_log(audit) == []
