"""Helpers for the web UI tests (test_app*.py, test_browser*.py): a tiny real checkpoint and test uploads.

No tests here. The checkpoint is a real ``resunet-checkpoint/1`` file of an untrained ``tiny`` ResUNet
working at 6 mm, so a prediction on the 91x109x91 example takes a second on 2 CPU cores; its masks
are arbitrary but real outputs of the real Predictor.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from resunet.cli.app_cmd import app_script
from resunet.package_data import EXAMPLE_BRAINMASK, EXAMPLE_DICOM, EXAMPLE_T1, MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
#: the page inside the package (resunet/webui/streamlit_app.py)
APP_SCRIPT = app_script()
EXAMPLE_MASK = EXAMPLE_BRAINMASK
BUNDLED_MODEL = MODEL_DIR / "brain_extraction.pt"
__all__ = ["APP_SCRIPT", "EXAMPLE_T1", "EXAMPLE_MASK", "EXAMPLE_DICOM", "BUNDLED_MODEL", "REPO"]


def apply_page_settings() -> None:
    """Set the page's shipped Streamlit settings (``resunet/webui/streamlit_config.toml``) in this process.

    ``resunet app`` passes them on Streamlit's command line; ``AppTest`` runs the page in-process, where
    only ``streamlit.config`` counts (server.address 127.0.0.1 among them: without it the page refuses
    to open on every interface with no login)."""
    import tomllib

    from streamlit import config

    text = (APP_SCRIPT.parent / "streamlit_config.toml").read_text(encoding="utf-8")
    for section, values in tomllib.loads(text).items():
        for key, value in values.items():
            config.set_option(f"{section}.{key}", value)


apply_page_settings()
#: Identifiers written into the second series of :func:`two_series_zip` (must never reach a log).
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-7731-XQ"


def open_page(model_dir: Path, tmp_path: Path, monkeypatch) -> "AppTest":
    """The page under AppTest with ``model_dir``'s ``tiny.pt`` as its default model, its session folders
    and audit log under ``tmp_path``; run once, without an exception."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RESUNET_APP_DEFAULT_MODEL", "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def make_tiny_model(path: Path, seed: int = 0, all_foreground: bool = False) -> Path:
    """Write an untrained tiny 3D ResUNet checkpoint (labels background/brain, 6 mm, 32^3 patches).

    ``all_foreground=True`` zeroes the output layer's weights and biases it towards label 1, so every
    voxel is predicted as "brain" (a known, visible mask for the browser test).
    """
    import torch

    from resunet.nets import ResUNet
    from resunet.training.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = ResUNet.from_preset("tiny", spatial_dims=3, in_channels=1, out_channels=2)
    if all_foreground:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.copy_(torch.tensor([-1.0, 1.0]))
    plan = {
        "spacing": [6.0, 6.0, 6.0],
        "normalization": [{"scheme": "zscore"}],
        "patch_size": [32, 32, 32],
        "batch_size": 2,
        "spatial_dims": 3,
        "modality": "MR",
    }
    save_checkpoint(
        path,
        state_dict=net.state_dict(),
        network=net.config,
        plan=plan,
        labels={0: "background", 1: "brain"},
        channels=["T1"],
        postprocess={"largest_component": False, "fill_holes": False, "min_island_voxels": 0},
        model_card={
            "name": "tiny-untrained",
            "intended_use": "tests of the web UI only",
            "training_data": "none (random weights)",
            "metrics": {"dice": 0.0},
        },
    )
    return path


def nifti_gz_bytes(img: nib.Nifti1Image) -> bytes:
    """A NIfTI image as the bytes of a .nii.gz file (written by nibabel)."""
    import gzip

    return gzip.compress(img.to_bytes(), mtime=0)


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A zip (deflated) holding ``entries`` (entry name -> bytes); names are written as given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def two_series_zip(tmp: Path) -> tuple[bytes, str]:
    """A zip of the example DICOM series plus a second, 4 mm series written by resunet's DICOM writer.

    Returns the zip bytes and the second series' SeriesInstanceUID.
    """
    from pydicom.uid import generate_uid

    from resunet.io import load_study, write_dicom_series
    from resunet.io.volume import Volume

    t1 = load_study(EXAMPLE_T1)
    small = t1.array[::2, ::2, ::2].copy()
    aff = t1.affine.copy()
    aff[:3, :3] = aff[:3, :3] * 2.0
    low = Volume(array=small, affine=aff, meta={"source": "downsampled"})
    uid = generate_uid()
    folder = tmp / "second"
    write_dicom_series(low, folder, series_description="T1 4mm copy", series_uid=uid, series_number=2,
                       patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    entries = {f"study/t1/{p.name}": p.read_bytes() for p in sorted(EXAMPLE_DICOM.iterdir()) if p.is_file()}
    entries.update({f"study/t1_4mm/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})
    return zip_bytes(entries), uid


def sr_only_zip() -> bytes:
    """A zip holding one Basic Text SR object (a DICOM report, no images), written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Report"
    ds.ValueType = "CONTAINER"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return zip_bytes({"report/sr.dcm": buf.getvalue()})


def bad_uploads() -> dict[str, list[tuple[str, bytes, str]]]:
    """Each bad upload of the foundation issue: case name -> files as AppTest ``set_value`` tuples."""
    t1 = EXAMPLE_T1.read_bytes()
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4))
    rng = np.random.default_rng(0)
    evil = zip_bytes({"../../escaped.dcm": b"x" * 100, "ok/a.dcm": b"y" * 100})
    return {
        "truncated_nifti": [("t1.nii.gz", t1[: len(t1) // 2], "application/gzip")],
        "text_as_nifti": [("notes.nii.gz", b"this is a text file, not a scan\n" * 20, "application/gzip")],
        "nifti_4d": [("fmri.nii.gz", nifti_gz_bytes(four_d), "application/gzip")],
        "empty_zip": [("empty.zip", zip_bytes({}), "application/zip")],
        "sr_only_zip": [("report.zip", sr_only_zip(), "application/zip")],
        "zip_slip": [("evil.zip", evil, "application/zip")],
        "random_dcm": [("IM0001.dcm", rng.bytes(4096), "application/dicom")],
        "empty_file": [("empty.dcm", b"", "application/dicom")],
        "mixed": [("t1.nii.gz", t1, "application/gzip"), ("IM0001.dcm", rng.bytes(512), "application/dicom")],
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bytes:
    """The body of ``url`` once it answers; fails when ``proc`` exits first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``, kill it if it has not exited 10 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
