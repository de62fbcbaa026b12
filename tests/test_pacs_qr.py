"""Query/retrieve over DIMSE against a real Orthanc (issue 24 points 1 and 4): C-FIND by accession
number, C-GET and C-MOVE of the study (the voxels that arrive are the study's), `resunet predict --pacs
dimse://...` storing the SEG back with C-STORE, and a retrieve that delivers less than C-FIND counted
failing with both counts and storing nothing."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import nibabel as nib
import numpy as np
import pydicom
import pytest

from orthanc_support import ORTHANC_AET, dicomweb_plugin, orthanc_binary, start_orthanc
from test_app_support import EXAMPLE_DICOM, free_port, make_tiny_model

from resunet.cli import main
from resunet.errors import PacsError
from resunet.io import load_study
from resunet.pacs.dimse_qr import DimseSource, QueryConfig, find_series, find_studies, retrieve_study

pytestmark = pytest.mark.skipif(orthanc_binary() is None or dicomweb_plugin() is None,
                                reason="Debian orthanc + orthanc-dicomweb not installed (scripts/setup-system.sh)")
ACCESSION = "ACC20261206"


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, move_port):
    """Orthanc holding the example study with an accession number; it knows us as RESUNET on move_port."""
    folder = tmp_path_factory.mktemp("qr")
    files = []
    for f in sorted(EXAMPLE_DICOM.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = ACCESSION
        out = folder / "src" / f.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    server = start_orthanc(folder / "orthanc", {"resunet": ("RESUNET", "127.0.0.1", move_port)})
    try:
        server.upload(files)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def source(archive) -> DimseSource:
    return DimseSource.parse(f"dimse://{ORTHANC_AET}@127.0.0.1:{archive.port}")


def test_url_parsing():
    assert DimseSource.parse("dimses://PACS@10.0.0.5:2762") == DimseSource("PACS", "10.0.0.5", 2762, True)
    with pytest.raises(Exception, match="dimse://AET@HOST:PORT"):
        DimseSource.parse("dimse://10.0.0.5:104")
    # date ranges are checked before any network traffic (the port is closed): open ends are allowed
    closed = DimseSource("X", "127.0.0.1", free_port())
    for bad in ("2026", "-", "20260101-2026"):
        with pytest.raises(Exception, match="use YYYYMMDD-YYYYMMDD"):
            find_studies(closed, QueryConfig(timeout=5), patient_id="P", date_range=bad)
    for ok in ("20260101", "20260101-", "-20261231", "20260101-20261231"):
        with pytest.raises(PacsError, match="unreachable"):
            find_studies(closed, QueryConfig(timeout=5), patient_id="P", date_range=ok)


def test_web_ui_config_refuses_a_bad_dimse_archive_at_start():
    from resunet.errors import ConfigError
    from resunet.webui.config import AppConfig

    with pytest.raises(ConfigError, match="dimse://AET@HOST:PORT"):
        AppConfig(pacs_url="dimse://pacs.local:104")
    with pytest.raises(ConfigError, match="pacs_move_port must be a TCP port"):
        AppConfig(pacs_url="dimse://PACS@pacs.local:104", pacs_move_port=70000)
    assert AppConfig.from_env({"RESUNET_APP_PACS_URL": "dimse://PACS@pacs.local:104",
                               "RESUNET_APP_PACS_MOVE_PORT": "11113"}).pacs_move_port == 11113


def test_find_then_get_and_move_bring_the_study(source, move_port, tmp_path):
    studies = find_studies(source, QueryConfig(), accession=ACCESSION)
    assert len(studies) == 1 and studies[0].n_instances == 91 and studies[0].accession == ACCESSION
    series = find_series(source, QueryConfig(), studies[0].study_uid)
    assert [s.n_instances for s in series] == [91] and series[0].modality == "MR"
    reference = np.asarray(load_study(EXAMPLE_DICOM).array)
    for method in ("get", "move"):
        cfg = QueryConfig(method=method, move_port=move_port)
        got = retrieve_study(source, cfg, studies[0].study_uid, tmp_path / method)
        assert got.received == {series[0].series_uid: 91}, method
        assert np.array_equal(np.asarray(load_study(tmp_path / method).array), reference), method
        # into memory: the same instances, byte for byte as the folder holds them, read by the same reader
        held = retrieve_study(source, cfg, studies[0].study_uid, None)
        assert held.received == got.received and held.files == [] and held.folder is None, method
        on_disk = {p.relative_to(tmp_path / method).as_posix(): p.read_bytes() for p in (tmp_path / method).rglob("*.dcm")}
        assert dict(held.study.files) == on_disk, method
        from_memory, from_disk = load_study(held.study), load_study(tmp_path / method)
        assert np.array_equal(np.asarray(from_memory.array), reference), method
        assert np.allclose(from_memory.affine, from_disk.affine), method
    assert find_studies(source, QueryConfig(), accession="NO-SUCH") == []


def test_predict_from_a_dimse_archive_stores_the_seg_back(archive, source, tmp_path, capsys):
    model = make_tiny_model(tmp_path / "tiny.pt")
    before = archive.get("/series")
    code = main(["predict", "--pacs", str(source), "--accession", ACCESSION, "--out", str(tmp_path / "out"),
                 "--model", str(model), "--no-tta", "--no-audit", "--no-progress", "--format", "nifti,seg,sr"])
    assert code == 0, capsys.readouterr().err
    new = [archive.get(f"/series/{s}") for s in archive.get("/series") if s not in before]
    assert sorted(s["MainDicomTags"]["Modality"] for s in new) == ["SEG", "SR"]
    case = json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"][0]
    assert case["status"] == "ok" and set(case["outputs"]) == {"mask", "seg", "sr"}
    # several matches, or none: a clear line, no model loaded, nothing stored
    code = main(["predict", "--pacs", str(source), "--accession", "NO-SUCH", "--out", str(tmp_path / "o2"),
                 "--model", str(model), "--no-audit"])
    assert code != 0 and "0 studies match" in capsys.readouterr().err


def test_a_retrieve_leaves_out_the_results_already_in_the_study(archive, source, move_port, tmp_path, capsys):
    """A SEG (and SR) stored back by an earlier run is not retrieved again with the images: only
    the MR series travels, by C-GET and by C-MOVE; asked for by its UID, the SEG series still comes."""
    model = make_tiny_model(tmp_path / "tiny.pt")
    code = main(["predict", "--pacs", str(source), "--accession", ACCESSION, "--out", str(tmp_path / "out"),
                 "--model", str(model), "--no-tta", "--no-audit", "--no-progress", "--format", "seg,sr"])
    assert code == 0, capsys.readouterr().err
    study_uid = find_studies(source, QueryConfig(), accession=ACCESSION)[0].study_uid
    listed = find_series(source, QueryConfig(), study_uid)
    assert {"SEG", "SR", "MR"} <= {s.modality for s in listed}
    mr = [s.series_uid for s in listed if s.modality == "MR"]
    assert len(mr) == 1
    for method in ("get", "move"):
        got = retrieve_study(source, QueryConfig(method=method, move_port=move_port), study_uid, None)
        assert got.received == {mr[0]: 91}, method
    seg = next(s for s in listed if s.modality == "SEG")
    from resunet.pacs.dimse_qr import series_to_retrieve

    assert series_to_retrieve(source, QueryConfig(), study_uid, seg.series_uid) == [seg]
    with pytest.raises(PacsError, match="has no series 1.2.3.4 in study"):
        series_to_retrieve(source, QueryConfig(), study_uid, "1.2.3.4")


def test_resunet_serve_pulls_a_study_from_a_dimse_archive(archive, source, tmp_path):
    """POST /v1/pacs/jobs on a service started with --pacs dimse://: C-FIND + C-GET as the node's AE
    title, the mask equals a local resunet predict of the same study, the SEG goes back with C-STORE."""
    import httpx
    from serve_support import ServiceProcess, wait_job

    model = make_tiny_model(tmp_path / "tiny.pt")
    study = find_studies(source, QueryConfig(), accession=ACCESSION)[0].study_uid
    assert main(["predict", str(EXAMPLE_DICOM), "--out", str(tmp_path / "local"), "--model", str(model), "--no-tta",
                 "--no-audit", "--no-progress", "--format", "nifti"]) == 0
    local = np.asarray(nib.load(next((tmp_path / "local").glob("*.nii.gz"))).dataobj)
    before = archive.get("/series")
    bad = ServiceProcess(tmp_path / "s0", model, "--pacs", "dimse://127.0.0.1:104")
    with pytest.raises(RuntimeError):
        bad.start(timeout=120)
    assert "dimse://AET@HOST:PORT" in bad.log()
    with ServiceProcess(tmp_path / "state", model, "--no-tta", "--format", "nifti,seg", "--pacs", str(source),
                        "--ae-title", "RESUNET") as svc:
        r = httpx.post(f"{svc.url}/v1/pacs/jobs", data={"study_uid": study}, timeout=60)
        assert r.status_code == 202, r.text
        job = wait_job(svc.url, r.json()["id"], timeout=240)
        assert job["state"] == "done", job
        assert [f.endswith(".seg.dcm") for f in job["result"]["stored_to_pacs"]["files"]] == [True]
        (tmp_path / "mask.nii.gz").write_bytes(httpx.get(f"{svc.url}/v1/jobs/{job['id']}/outputs/mask", timeout=60).content)
        assert np.array_equal(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj), local)
        missing = httpx.post(f"{svc.url}/v1/pacs/jobs", data={"study_uid": "1.2.3.999"}, timeout=60)
        failed = wait_job(svc.url, missing.json()["id"], timeout=120)
        assert failed["state"] == "failed" and "has no study 1.2.3.999" in failed["error"], failed
    new = [archive.get(f"/series/{s}") for s in archive.get("/series") if s not in before]
    assert [s["MainDicomTags"]["Modality"] for s in new] == ["SEG"]


def test_web_ui_browse_a_dimse_archive_segment_and_send_back(archive, source, move_port, tmp_path, monkeypatch):
    """The page's Browse PACS on dimse://: C-FIND with the page's filters (accession, patient id, dates),
    C-MOVE of the chosen study to the page's AE title into the session's workspace (the voxels are the
    study's), segmenting it, and C-STORE of the SEG into the same study on the archive."""
    from streamlit.testing.v1 import AppTest
    from test_app_support import APP_SCRIPT

    make_tiny_model(tmp_path / "models" / "tiny.pt")
    for key, value in {"MODEL_DIR": tmp_path / "models", "DEFAULT_MODEL": "tiny.pt", "TEMP_DIR": tmp_path / "sessions",
                       "PACS_URL": source, "PACS_AE_TITLE": "RESUNET", "PACS_MOVE_PORT": move_port}.items():
        monkeypatch.setenv(f"RESUNET_APP_{key}", str(value))
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == []
    study_uid = find_studies(source, QueryConfig(), accession=ACCESSION)[0].study_uid
    patient = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).PatientID)

    at.text_input(key="pacs_accession").input("NO-SUCH").run()
    assert any("lists no studies" in i.value for i in at.info)
    at.text_input(key="pacs_accession").input(ACCESSION).run()
    at.text_input(key="pacs_patient_id").input(patient).run()
    at.text_input(key="pacs_dates").input("19000101-").run()
    assert [e.value for e in at.error] == [] and not any("lists no studies" in i.value for i in at.info)
    box = at.selectbox(key="pacs_study")
    assert len(box.options) == 1 and "resunet example study · MR" in box.options[0], box.options
    at.button(key="pacs_open").click().run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == []
    staged = at.session_state["study"]
    assert np.array_equal(np.asarray(load_study(staged.path).array), np.asarray(load_study(EXAMPLE_DICOM).array))
    assert len(at.session_state["results"]) == 1

    before = archive.get(f"/studies/{archive.get('/studies')[0]}")["Series"]
    at.button(key="pacs_send").click().run()
    assert not at.exception, at.exception
    assert any(f"in study {study_uid}" in s.value for s in at.success), [e.value for e in at.error]
    after = archive.get(f"/studies/{archive.get('/studies')[0]}")["Series"]
    new = [archive.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in after if s not in before]
    assert new == ["SEG"]


def test_a_c_move_the_archive_cannot_deliver_fails_and_nothing_is_segmented_or_stored(archive, source, tmp_path):
    """A C-MOVE Orthanc cannot complete, through the whole predict-from-PACS step: to a destination it
    knows (registered through its REST API) where nobody listens, so every sub-operation fails. A
    PacsError with the archive's status and counts; no case is segmented, nothing new is in the archive."""
    from resunet.inference.batch import BatchOptions
    from resunet.inference.predictor import Predictor
    from resunet.pacs.segment import segment_from_dimse

    study = find_studies(source, QueryConfig(), accession=ACCESSION)[0].study_uid
    predictor = Predictor(make_tiny_model(tmp_path / "tiny.pt"), tta=False)
    nobody_port = free_port()  # Orthanc sends here; nothing listens
    req = urllib.request.Request(f"{archive.url}/modalities/ghost", method="PUT",
                                 data=json.dumps({"AET": "GHOST", "Host": "127.0.0.1", "Port": nobody_port}).encode())
    urllib.request.urlopen(req, timeout=30).close()
    before = archive.get("/series")
    out = tmp_path / "out"
    opts = BatchOptions(out_dir=out, formats=("seg",), progress=False, audit_db=False, resume=False)
    cfg = QueryConfig(calling_aet="GHOST", method="move", move_port=free_port(), timeout=20)
    with pytest.raises(PacsError, match=r"C-MOVE of series .* status 0x[0-9A-F]{4}.*failed.*nothing was segmented"
                                        r"|incompletely.*nothing was segmented") as err:
        segment_from_dimse(source, cfg, study, predictor, opts)
    assert "\n" not in str(err.value)
    assert not (out / "predictions.json").exists() and not list(out.glob("**/*.dcm"))
    assert archive.get("/series") == before


def test_web_ui_does_not_open_a_study_the_archive_cannot_deliver(archive, source, tmp_path, monkeypatch):
    """The page calls as GHOST, whom Orthanc sends its C-MOVE to at a port where nobody listens: the
    archive's reason is one message on the page, no study is opened, nothing is segmented."""
    from streamlit.testing.v1 import AppTest
    from test_app_support import APP_SCRIPT

    req = urllib.request.Request(f"{archive.url}/modalities/ghost", method="PUT",
                                 data=json.dumps({"AET": "GHOST", "Host": "127.0.0.1", "Port": free_port()}).encode())
    urllib.request.urlopen(req, timeout=30).close()
    make_tiny_model(tmp_path / "models" / "tiny.pt")
    for key, value in {"MODEL_DIR": tmp_path / "models", "DEFAULT_MODEL": "tiny.pt", "TEMP_DIR": tmp_path / "sessions",
                       "PACS_URL": source, "PACS_AE_TITLE": "GHOST", "PACS_MOVE_PORT": free_port()}.items():
        monkeypatch.setenv(f"RESUNET_APP_{key}", str(value))
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=180)
    at.run()
    at.text_input(key="pacs_accession").input(ACCESSION).run()
    at.button(key="pacs_open").click().run()
    assert not at.exception, at.exception
    assert any("nothing was segmented or stored back" in e.value for e in at.error), [e.value for e in at.error]
    state = at.session_state
    assert ("study" not in state or state["study"] is None) and ("results" not in state or not state["results"])
    assert not list((tmp_path / "sessions").glob("*/pacs/**/*.dcm"))


def test_a_retrieve_short_of_what_cfind_counted_fails_and_stores_nothing(archive, source, tmp_path):
    study = find_studies(source, QueryConfig(), accession=ACCESSION)[0].study_uid
    series = find_series(source, QueryConfig(), study)  # 91 counted...
    # ...then the archive loses three of them before the retrieve (a real DELETE on Orthanc)
    mr = [s for s in archive.get("/series") if archive.get(f"/series/{s}")["MainDicomTags"]["Modality"] == "MR"][0]
    for inst in archive.get(f"/series/{mr}")["Instances"][:3]:
        urllib.request.urlopen(urllib.request.Request(f"{archive.url}/instances/{inst}", method="DELETE"), timeout=30)
    with pytest.raises(PacsError, match=r"delivered fewer instances than its C-FIND counted \(series .*: 88 of 91\)"):
        retrieve_study(source, QueryConfig(), study, tmp_path / "short", series)
    shutil.rmtree(tmp_path / "short", ignore_errors=True)


def _openssl(folder, *args):
    import subprocess

    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)


def _ca_and_certs(folder):
    """Two test CAs (the second one signs nothing we use: "the wrong CA"), a server and a client
    certificate signed by the first, and an expired server certificate (openssl ca with dates in 2020)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test CA (Debian openssl)")
    for ca in ("ca", "other-ca"):
        _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=resunet test {ca}")
    for name in ("server", "client", "expired"):
        _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=127.0.0.1 {name}")
        (folder / f"{name}.key").chmod(0o600)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("1000\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca=test\n[test]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\ndefault_md=sha256\n"
        "policy=any\ncertificate=ca.crt\nprivate_key=ca.key\nx509_extensions=ext\n[any]\ncommonName=supplied\n"
        "[ext]\nsubjectAltName=IP:127.0.0.1\n")
    _openssl(folder, "ca", "-batch", "-config", "ca.cnf", "-in", "expired.csr", "-out", "expired.crt",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")
    return {n: folder / n for n in ("ca.crt", "other-ca.crt", "server.crt", "server.key", "client.crt", "client.key",
                                    "expired.crt", "expired.key")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _ca_and_certs(tmp_path_factory.mktemp("pki"))


def test_query_retrieve_and_store_back_over_tls(pki, tmp_path, capsys, caplog):
    """A second Orthanc that speaks DICOM over TLS only and checks client certificates, with a CA the
    test made: `resunet predict --pacs dimses://` finds the study (C-FIND), fetches it (C-GET) and
    stores its SEG back (C-STORE) over TLS; a wrong CA is refused with one clear line, no plaintext."""
    c = pki
    server = start_orthanc(tmp_path / "orthanc", {"resunet": ("RESUNET", "127.0.0.1", free_port())}, extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(c["server.crt"]), "DicomTlsPrivateKey": str(c["server.key"]),
        "DicomTlsTrustedCertificates": str(c["ca.crt"]), "DicomTlsRemoteCertificateRequired": True,
    })
    try:
        server.upload(sorted(EXAMPLE_DICOM.glob("*.dcm")))
        src = DimseSource.parse(f"dimses://{ORTHANC_AET}@127.0.0.1:{server.port}")
        cfg = QueryConfig(tls_ca=str(c["ca.crt"]), tls_cert=str(c["client.crt"]), tls_key=str(c["client.key"]))
        study = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        assert [s.study_uid for s in find_studies(source=src, cfg=cfg, study_uid=study)] == [study]
        got = retrieve_study(src, cfg, study, tmp_path / "got")
        assert sum(got.received.values()) == 91
        assert np.array_equal(np.asarray(load_study(tmp_path / "got").array), np.asarray(load_study(EXAMPLE_DICOM).array))

        model = make_tiny_model(tmp_path / "tiny.pt")
        before = server.get("/series")
        tls = ["--tls-ca", str(c["ca.crt"]), "--tls-cert", str(c["client.crt"]), "--tls-key", str(c["client.key"])]
        code = main(["predict", "--pacs", str(src), "--study", study, "--out", str(tmp_path / "out"), *tls,
                     "--model", str(model), "--no-tta", "--no-audit", "--no-progress", "--format", "nifti,seg"])
        assert code == 0, capsys.readouterr().err
        new = [server.get(f"/series/{s}") for s in server.get("/series") if s not in before]
        assert [s["MainDicomTags"]["Modality"] for s in new] == ["SEG"]

        # the archive's certificate is not signed by the CA we were given: refused, said so, nothing stored
        tls[1] = str(c["other-ca.crt"])
        code = main(["predict", "--pacs", str(src), "--study", study, "--out", str(tmp_path / "o2"), *tls,
                     "--model", str(model), "--no-audit", "--no-progress"])
        err = capsys.readouterr().err
        assert code != 0 and f"not signed by the CA file {c['other-ca.crt']}" in err and "no plaintext" in err, err
        assert "Traceback" not in err
        # no client certificate: the archive refuses us in the handshake, and the line says what to give
        with pytest.raises(PacsError, match="refused our client certificate"):
            find_studies(src, QueryConfig(tls_ca=str(c["ca.crt"]), timeout=10), study_uid=study)
        # plaintext to the TLS port is not "fallen back" to: the association fails
        with pytest.raises(PacsError):
            find_studies(DimseSource.parse(f"dimse://{ORTHANC_AET}@127.0.0.1:{server.port}"),
                         QueryConfig(timeout=5), study_uid=study)
        assert len(server.get("/series")) == len(before) + 1

        # resunet serve --pacs dimses:// with the same files: a pacs-pull job over TLS stores a second SEG
        import httpx
        from serve_support import ServiceProcess, wait_job

        tls[1] = str(c["ca.crt"])
        with ServiceProcess(tmp_path / "state", model, "--no-tta", "--format", "nifti,seg", "--pacs", str(src),
                            *tls) as svc:
            r = httpx.post(f"{svc.url}/v1/pacs/jobs", data={"study_uid": study}, timeout=60)
            assert r.status_code == 202, r.text
            job = wait_job(svc.url, r.json()["id"], timeout=240)
            assert job["state"] == "done", job
        assert len(server.get("/series")) == len(before) + 2
    finally:
        server.stop()


def test_serve_checks_the_tls_files_at_start(pki, tmp_path):
    """ServeConfig refuses a dimses:// archive whose key file is missing, and TLS files without dimses://."""
    from resunet.errors import ConfigError
    from resunet.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=r"cannot read the private key .*gone.key \(--tls-key\)"):
        ServeConfig(state_dir=tmp_path / "s", pacs_url="dimses://PACS@127.0.0.1:2762", tls_ca=str(pki["ca.crt"]),
                    tls_cert=str(pki["client.crt"]), tls_key=str(tmp_path / "gone.key"))
    with pytest.raises(ConfigError, match="--pacs dimses://"):
        ServeConfig(state_dir=tmp_path / "s", pacs_url="dimse://PACS@127.0.0.1:104", tls_ca=str(pki["ca.crt"]))
    # the node over TLS (--dicom-tls): needs the node's port and its certificate and key, checked at start
    with pytest.raises(ConfigError, match="--dicom-tls needs the node's certificate and key"):
        ServeConfig(state_dir=tmp_path / "s", dicom_port=11112, dicom_tls=True, tls_ca=str(pki["ca.crt"]))
    with pytest.raises(ConfigError, match="give --dicom-port too"):
        ServeConfig(state_dir=tmp_path / "s", dicom_tls=True, tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    with pytest.raises(ConfigError, match="does not match the certificate"):
        ServeConfig(state_dir=tmp_path / "s", dicom_port=11112, dicom_tls=True, tls_cert=str(pki["server.crt"]),
                    tls_key=str(pki["client.key"]))
    ok = ServeConfig(state_dir=tmp_path / "s", dicom_port=11112, dicom_tls=True, tls_ca=str(pki["ca.crt"]),
                     tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    assert ok.node_ssl_context() is not None


def test_an_expired_archive_certificate_is_named(pki):
    """A DICOM TLS server (pynetdicom's, with a certificate that expired in 2020): the C-FIND fails
    with "has expired", not with a generic "unreachable"."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from resunet.pacs.dimse import tls_server_context

    ae = AE(ae_title="EXPIRED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             ssl_context=tls_server_context(None, str(pki["expired.crt"]), str(pki["expired.key"])))
    try:
        with pytest.raises(PacsError, match=r"EXPIRED@127.0.0.1:\d+: its TLS certificate has expired"):
            find_studies(DimseSource.parse(f"dimses://EXPIRED@127.0.0.1:{port}"),
                         QueryConfig(tls_ca=str(pki["ca.crt"]), timeout=10), study_uid="1.2.3")
    finally:
        server.shutdown()


def test_tls_files_are_checked_before_connecting(pki, tmp_path, caplog):
    """Missing or unreadable key files are one line naming the file and option; a key others can read
    is used with a warning (chmod 600)."""
    from resunet.errors import ConfigError
    from resunet.pacs.dimse import tls_client_context

    with pytest.raises(ConfigError, match=r"cannot read the private key .*nope.key \(--tls-key\)"):
        tls_client_context(str(pki["ca.crt"]), str(pki["client.crt"]), str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError, match=r"cannot read the CA file .*missing-ca.crt \(--tls-ca\)"):
        tls_client_context(str(tmp_path / "missing-ca.crt"))
    with pytest.raises(ConfigError, match="does not match the certificate"):
        tls_client_context(str(pki["ca.crt"]), str(pki["client.crt"]), str(pki["server.key"]))
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki["client.key"].read_bytes())
    loose.chmod(0o644)
    with caplog.at_level("WARNING", logger="resunet.pacs.dimse"):
        tls_client_context(str(pki["ca.crt"]), str(pki["client.crt"]), str(loose))
    assert "can be read by group/others (mode 644): chmod 600" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="resunet.pacs.dimse"):
        tls_client_context(str(pki["ca.crt"]), str(pki["client.crt"]), str(pki["client.key"]))
    assert "chmod 600" not in caplog.text


def test_dimse_sockets_have_nagle_and_delayed_ack_off_and_instances_are_kept_as_sent(tmp_path):
    """Issue 24: 45-48 ms per instance of a C-GET from Orthanc was Nagle (DCMTK's default) against our
    delayed ACK. Every association resunet opens or accepts gets TCP_NODELAY (EVT_CONN_OPEN) and
    TCP_QUICKACK after each PDU it sends, and its reactor polled every DUL_POLL_S instead of 1 ms;
    checked on both ends of a real association to the node,
    whose stored file holds the data set bytes as they were sent (no decode + re-encode)."""
    import socket

    from pynetdicom import AE, evt

    from resunet.pacs import ListenerConfig, StoreListener
    from resunet.pacs.dimse import DUL_POLL_S, tcp_handlers

    src = sorted(EXAMPLE_DICOM.glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    seen: dict[str, list] = {"nodelay": [], "poll": []}
    got: list = []
    config = ListenerConfig(ae_title="RESUNET", port=free_port(), incoming_dir=tmp_path / "in", settle_seconds=0.3)
    with StoreListener(config, got.append) as node:
        def probe(event):  # after tcp_handlers' own EVT_DATA_SENT: the socket as it is while in use
            seen["nodelay"].append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            seen["poll"].append(event.assoc.dul._run_loop_delay)

        ae = AE(ae_title="SENDER")
        ae.add_requested_context(ds.SOPClassUID, [syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RESUNET",
                             evt_handlers=[*tcp_handlers(), (evt.EVT_DATA_SENT, probe)])
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0
        node_side = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s, _ in node._conns if s.fileno() != -1]
        node_polls = [a.dul._run_loop_delay for a in node._server.active_associations]
        assoc.release()
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen["nodelay"] and all(seen["nodelay"]), seen  # our requestor socket
    assert node_side and all(node_side), node_side  # the node's accepted socket, while the association is open
    assert DUL_POLL_S < 0.001 and set(seen["poll"]) == {DUL_POLL_S}  # the reactor's idle sleep shortened (pynetdicom's default: 1 ms)
    assert node_polls and set(node_polls) == {DUL_POLL_S}, node_polls  # and on the node's side
    stored = next(got[0].folder.glob("*.dcm"))

    def dataset_bytes(path):  # what follows the preamble, "DICM" and the file meta group
        meta = pydicom.filereader.read_file_meta_info(path)
        return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]

    assert pydicom.filereader.read_file_meta_info(stored).TransferSyntaxUID == syntax
    assert dataset_bytes(stored) == dataset_bytes(src)


def test_the_service_dicom_node_and_c_move_over_tls(pki, tmp_path, capsys):
    """Issue 24: an Orthanc that speaks DICOM over TLS only (client certificates required), with the test's
    CA. (a) `resunet serve --dicom-port P --dicom-tls` with that CA: Orthanc pushes the study to the node
    over TLS (its modality entry has UseDicomTls), the series becomes a job, and the SEG goes back to
    Orthanc with C-STORE over TLS (--store-to); a plaintext sender gets no association. (b) C-MOVE over
    TLS: `resunet predict --pacs dimses:// --retrieve move` listens with TLS and Orthanc moves the study to it."""
    import httpx
    from pynetdicom import AE
    from serve_support import ServiceProcess

    c = pki
    node_port, move_port = free_port(), free_port()
    modalities = {name: {"AET": aet, "Host": "127.0.0.1", "Port": port, "UseDicomTls": True}
                  for name, aet, port in (("node", "RESUNET", node_port), ("mover", "RESUNETQR", move_port))}
    server = start_orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(c["server.crt"]), "DicomTlsPrivateKey": str(c["server.key"]),
        "DicomTlsTrustedCertificates": str(c["ca.crt"]), "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": modalities,
    })
    try:
        server.upload(sorted(EXAMPLE_DICOM.glob("*.dcm")))
        study = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        (orthanc_study,) = server.get("/studies")
        model = make_tiny_model(tmp_path / "tiny.pt")
        tls = ["--tls-ca", str(c["ca.crt"]), "--tls-cert", str(c["server.crt"]), "--tls-key", str(c["server.key"])]
        before = server.get("/series")
        with ServiceProcess(tmp_path / "state", model, "--no-tta", "--format", "nifti,seg", "--dicom-port",
                            str(node_port), "--dicom-tls", *tls, "--settle-seconds", "1",
                            "--store-to", f"127.0.0.1:{server.port}:{ORTHANC_AET}") as svc:
            plain = AE(ae_title="PLAIN")
            plain.add_requested_context("1.2.840.10008.1.1")
            plain.acse_timeout = plain.network_timeout = 5
            assoc = plain.associate("127.0.0.1", node_port, ae_title="RESUNET")
            assert not assoc.is_established  # the node speaks TLS only
            req = urllib.request.Request(f"{server.url}/modalities/node/store", data=orthanc_study.encode(), method="POST")
            urllib.request.urlopen(req, timeout=300).read()  # Orthanc's C-STORE over TLS to the node
            deadline = time.monotonic() + 240
            done: list = []
            while time.monotonic() < deadline and not done:
                jobs = httpx.get(f"{svc.url}/v1/jobs", timeout=30).json()["jobs"]
                done = [j for j in jobs if j["kind"] == "dicom-series" and j["state"] in ("done", "failed")]
                time.sleep(0.3)
            assert len(done) == 1 and done[0]["state"] == "done", done or svc.log()[-3000:]
            assert "(TLS)" in svc.log() or "over TLS" in svc.log()
        new = [server.get(f"/series/{s}") for s in server.get("/series") if s not in before]
        assert [s["MainDicomTags"]["Modality"] for s in new] == ["SEG"]  # sent back over TLS

        src = DimseSource.parse(f"dimses://{ORTHANC_AET}@127.0.0.1:{server.port}")
        cfg = QueryConfig(calling_aet="RESUNETQR", method="move", move_port=move_port, tls_ca=str(c["ca.crt"]),
                          tls_cert=str(c["server.crt"]), tls_key=str(c["server.key"]))
        got = retrieve_study(src, cfg, study, tmp_path / "moved", [s for s in find_series(src, cfg, study)
                                                                   if s.modality == "MR"])
        assert sum(got.received.values()) == 91
        assert np.array_equal(np.asarray(load_study(tmp_path / "moved").array),
                              np.asarray(load_study(EXAMPLE_DICOM).array))
    finally:
        server.stop()


def test_predict_routes_each_pulled_series_to_its_rule_and_stores_its_seg(tmp_path, capsys):
    """Issue 24: `resunet predict --pacs URL --study UID --routes FILE` (DICOMweb and DIMSE) pulls the study
    (the example MR series plus a CT copy of it), segments the MR series with its rule's model into
    OUT/<rule>/ (the rule in the record and the provenance), stores that SEG back, and leaves the CT series
    alone, named once in the messages by UID, modality and size."""
    from resunet.reports.audit import read_runs

    model = make_tiny_model(tmp_path / "tiny.pt")
    files = []
    ct_series = pydicom.uid.generate_uid()
    for f in sorted(EXAMPLE_DICOM.glob("*.dcm")):
        files.append(f)
        ds = pydicom.dcmread(f)
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "CT", ct_series, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = tmp_path / "ct" / f.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    mr_series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"rules:\n  - name: head MR\n    match: {{modality: MR, min_slices: 20}}\n    model: {model}\n")
    server = start_orthanc(tmp_path / "orthanc", {"resunet": ("RESUNET", "127.0.0.1", free_port())})
    try:
        server.upload(files)
        for kind, url in (("dimse", f"dimse://{ORTHANC_AET}@127.0.0.1:{server.port}"), ("dicomweb", server.dicomweb)):
            before = server.get("/series")
            out = tmp_path / f"out-{kind}"
            code = main(["predict", "--pacs", url, "--study", study, "--routes", str(routes), "--out", str(out),
                         "--no-tta", "--audit-db", str(tmp_path / "audit.sqlite"), "--no-progress", "--format", "nifti,seg"])
            err = capsys.readouterr().err
            assert code == 0, err
            assert f"series {ct_series}: no routing rule matches (CT, 91 slices); left alone" in err, err
            assert err.count(ct_series) == 1 and "Traceback" not in err
            summary = json.loads((out / "head_MR" / "predictions.json").read_text())  # OUT/<safe rule name>/
            (rec,) = summary["cases"]
            assert rec["status"] == "ok" and rec["route"] == "head MR" and rec["series_uid"] == mr_series
            (run,) = [r for r in read_runs(tmp_path / "audit.sqlite") if r["run_id"] == summary["provenance"]["run_id"]]
            assert run["provenance"]["route"] == "head MR"  # the rule in the audit record
            assert sorted(p.name for p in out.iterdir()) == ["head_MR"]  # nothing for the CT series
            new = [server.get(f"/series/{s}") for s in server.get("/series") if s not in before]
            assert [s["MainDicomTags"]["Modality"] for s in new] == ["SEG"], kind
            (seg_id,) = [s["Instances"][0] for s in new]
            seg = pydicom.dcmread(__import__("io").BytesIO(urllib.request.urlopen(
                f"{server.url}/instances/{seg_id}/file", timeout=30).read()))
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == mr_series  # the MR series' SEG
    finally:
        server.stop()


def test_the_series_of_a_study_are_retrieved_in_parallel_and_arrive_whole(tmp_path):
    """Issue 23 point 2: a study of several series is retrieved with several associations in flight
    (QueryConfig.parallel), by C-GET and by C-MOVE, and what arrives is what one association at a time
    brings: every instance, byte for byte, each series counted."""
    move_port = free_port()
    files = []
    series_uids = []
    for k in range(3):  # the example MR series and two copies as other series, 91 instances each
        uid = pydicom.uid.generate_uid() if k else None
        for f in sorted(EXAMPLE_DICOM.glob("*.dcm")):
            if uid is None:
                files.append(f)
                continue
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out = tmp_path / f"copy{k}" / f.name
            out.parent.mkdir(exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
            files.append(out)
        series_uids.append(uid or str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    server = start_orthanc(tmp_path / "orthanc", {"resunetqr": ("RESUNETQR", "127.0.0.1", move_port)})
    try:
        server.upload(files)
        src = DimseSource.parse(f"dimse://{ORTHANC_AET}@127.0.0.1:{server.port}")
        for method in ("get", "move"):
            got = {}
            for parallel in (1, 3):
                cfg = QueryConfig(calling_aet="RESUNETQR", method=method, move_port=move_port, parallel=parallel)
                held = retrieve_study(src, cfg, study, None)
                assert held.received == {uid: 91 for uid in series_uids}, (method, parallel)
                got[parallel] = dict(held.study.files)
            assert len(got[3]) == 273 and got[3] == got[1], method
    finally:
        server.stop()
    from resunet.errors import ConfigError

    with pytest.raises(ConfigError, match="parallel retrieves must be 1 or more"):
        QueryConfig(parallel=0)
