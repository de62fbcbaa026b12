"""WADO-RS pulls keep the instances as the archive sent them (issue 23 point 2), against a real Orthanc.

The example study and RLE Lossless / JPEG-LS Lossless copies of it (encoded by pydicom, new UIDs) are
uploaded to a real Orthanc on loopback. :meth:`PacsClient.retrieve` must write each instance
byte-for-byte as uploaded (nothing parsed and serialised again on the way), and the pulled folder must
read into the same voxels and affine as the original files. :meth:`PacsClient.fetch` (what
``segment_from_pacs`` uses) keeps the instances in memory: read from there they must give the same
volume as the files, by the same reader; a series with one damaged instance must fail with a message
naming it, and nothing may be stored back.
"""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_support import dicomweb_plugin, orthanc_binary, start_orthanc
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid
from test_app_support import BUNDLED_MODEL, EXAMPLE_DICOM, free_port

from resunet.errors import PacsError
from resunet.io import load_study, sha256_path
from resunet.pacs import PacsClient, PacsConfig

pytestmark = [
    pytest.mark.skipif(orthanc_binary() is None or dicomweb_plugin() is None,
                       reason="Debian orthanc + orthanc-dicomweb not installed (scripts/setup-system.sh installs them)"),
]
N_RLE = 12  # slices of the compressed copy: enough for a stack, small for 2 cores
N_DEFLATE = 4
N_JPEGLS = 12
DAMAGED_SLICE = 5  # the instance of the damaged series whose RLE header is broken


def _copy_as_new_series(source: Path, n: int):
    """The first ``n`` example slices as datasets of a new study and series."""
    study, series = generate_uid(), generate_uid()
    for f in sorted(source.glob("*.dcm"))[:n]:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        yield ds


def _compressed_series(out: Path, syntax: str, n_slices: int) -> Path:
    """The first ``n_slices`` of the example re-encoded in ``syntax`` by pydicom's encoders, as a new study in ``out``."""
    for n, ds in enumerate(_copy_as_new_series(EXAMPLE_DICOM, n_slices)):
        ds.compress(syntax)
        ds.save_as(out / f"{n:03d}.dcm", enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def rle_folder(tmp_path_factory) -> Path:
    """The first slices of the example re-encoded as RLE Lossless by pydicom, as a new study."""
    return _compressed_series(tmp_path_factory.mktemp("rle"), RLELossless, N_RLE)


@pytest.fixture(scope="module")
def deflate_folder(tmp_path_factory) -> Path:
    """A Deflated Explicit VR series whose deflate stream was made at zlib level 1 (as a fast sender
    would): pydicom's writer deflates at its own level, so any parse-and-write on the way changes the
    bytes; only a pull that keeps the bytes as sent gives them back unchanged."""
    out = tmp_path_factory.mktemp("deflate")
    for n, ds in enumerate(_copy_as_new_series(EXAMPLE_DICOM, N_DEFLATE)):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, (0002,0000) and group 2
        packer = zlib.compressobj(1, zlib.DEFLATED, -15)
        body = packer.compress(zlib.decompress(data[meta_end:], -15)) + packer.flush()
        assert body != data[meta_end:]  # the level-1 stream differs from pydicom's own
        (out / f"{n:03d}.dcm").write_bytes(data[:meta_end] + body)
    return out


@pytest.fixture(scope="module")
def jpegls_folder(tmp_path_factory) -> Path:
    """The first slices of the example re-encoded as JPEG-LS Lossless by pydicom (pyjpegls), as a new study."""
    return _compressed_series(tmp_path_factory.mktemp("jpegls"), JPEGLSLossless, N_JPEGLS)


@pytest.fixture(scope="module")
def damaged_folder(tmp_path_factory) -> Path:
    """A whole example series in RLE (a new study) in which one instance's RLE stream is cut in half:
    valid DICOM that the archive stores, but whose pixel data no decoder can decode."""
    out = tmp_path_factory.mktemp("damaged")
    for n, ds in enumerate(_copy_as_new_series(EXAMPLE_DICOM, 1000)):
        ds.compress(RLELossless)
        if n == DAMAGED_SLICE:
            frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])
        ds.save_as(out / f"{n:03d}.dcm", enforce_file_format=True)
    return out


N_TWO = 8  # slices of each series of the two-series study


@pytest.fixture(scope="module")
def two_series_folder(tmp_path_factory) -> Path:
    """One study of two series (folders ``a``, ``b``): the first example slices uncompressed and the
    next ones in RLE, so :meth:`PacsClient.fetch` has two series to retrieve at once."""
    out = tmp_path_factory.mktemp("two")
    study = generate_uid()
    files = sorted(EXAMPLE_DICOM.glob("*.dcm"))
    for name, chunk in (("a", files[:N_TWO]), ("b", files[N_TWO: 2 * N_TWO])):
        (out / name).mkdir()
        series = generate_uid()
        for n, f in enumerate(chunk):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if name == "b":
                ds.compress(RLELossless)
            ds.save_as(out / name / f"{n:03d}.dcm", enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, rle_folder, deflate_folder, jpegls_folder, damaged_folder, two_series_folder):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), {})
    try:
        server.upload(sorted(EXAMPLE_DICOM.glob("*.dcm")) + sorted(rle_folder.glob("*.dcm"))
                      + sorted(deflate_folder.glob("*.dcm")) + sorted(jpegls_folder.glob("*.dcm"))
                      + sorted(damaged_folder.glob("*.dcm")) + sorted(two_series_folder.rglob("*.dcm")))
        yield server
    finally:
        server.stop()


def _pull_and_compare(orthanc, source: Path, tmp_path: Path) -> None:
    files = sorted(source.glob("*.dcm"))
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    pulled = PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study, tmp_path / "pulled")
    assert len(pulled) == len(files)
    # as sent: every pulled file is one of the uploaded files, byte for byte
    assert sorted(p.read_bytes() for p in pulled) == sorted(f.read_bytes() for f in files)
    got, want = load_study(tmp_path / "pulled"), load_study(source)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got.array), np.asarray(want.array))
    np.testing.assert_array_equal(got.affine, want.affine)


def test_wado_pull_keeps_instances_as_sent_and_reads_like_the_files(orthanc, tmp_path):
    _pull_and_compare(orthanc, EXAMPLE_DICOM, tmp_path)


def test_wado_pull_of_an_rle_series_keeps_it_compressed_and_reads_like_the_files(orthanc, rle_folder, tmp_path):
    assert str(pydicom.dcmread(next(rle_folder.glob("*.dcm"))).file_meta.TransferSyntaxUID) == RLELossless
    _pull_and_compare(orthanc, rle_folder, tmp_path)


def test_wado_pull_writes_the_bytes_as_sent_not_a_reserialised_copy(orthanc, deflate_folder, tmp_path):
    _pull_and_compare(orthanc, deflate_folder, tmp_path)


def _study_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _fetch_and_compare(orthanc, source: Path, tmp_path: Path) -> None:
    """The study pulled into memory reads into the voxels, affine and source headers of the files,
    and of the folder :meth:`PacsClient.retrieve` writes (same names, same hash)."""
    client = PacsClient(PacsConfig(orthanc.dicomweb))
    study_uid = _study_of(source)
    study = client.fetch(study_uid)
    files = sorted(source.glob("*.dcm"))
    assert len(study) == len(files)
    assert sorted(study.files.values()) == sorted(f.read_bytes() for f in files)  # as sent, in memory
    got, want = load_study(study), load_study(source)
    assert got.shape == want.shape and got.array.dtype == want.array.dtype
    np.testing.assert_array_equal(np.asarray(got.array), np.asarray(want.array))
    np.testing.assert_array_equal(got.affine, want.affine)
    # the outputs' references: the headers of the same instances, in the same slice order
    want_sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in want.meta["dicom_files"]]
    assert [str(ds.SOPInstanceUID) for ds in got.meta["dicom_datasets"]] == want_sops
    assert "PixelData" not in got.meta["dicom_datasets"][0]
    # headers only, detached from the bytes they were parsed from: they pickle (worker processes, Ray)
    assert [str(ds.SOPInstanceUID) for ds in pickle.loads(pickle.dumps(got.meta["dicom_datasets"]))] == want_sops
    # the same names and hash as the folder retrieve() writes, so records do not depend on the path taken
    client.retrieve(study_uid, tmp_path / "folder")
    assert study.sha256() == sha256_path(tmp_path / "folder")
    assert sorted(p.relative_to(tmp_path / "folder").as_posix() for p in (tmp_path / "folder").rglob("*.dcm")) \
        == sorted(study.files)


def test_fetch_in_memory_reads_like_the_files(orthanc, tmp_path):
    _fetch_and_compare(orthanc, EXAMPLE_DICOM, tmp_path)


def test_fetch_in_memory_of_an_rle_series_reads_like_the_files(orthanc, rle_folder, tmp_path):
    _fetch_and_compare(orthanc, rle_folder, tmp_path)


def test_fetch_in_memory_of_a_jpegls_series_decoded_in_worker_processes_reads_like_the_files(
        orthanc, jpegls_folder, tmp_path, monkeypatch):
    """JPEG-LS from memory through the decode worker processes (the bytes go to them, not a path): with
    pyjpegls as the first choice (imagecodecs, the default, decodes in threads of this process)."""
    import resunet.dicom_decode as dd

    assert str(pydicom.dcmread(next(jpegls_folder.glob("*.dcm"))).file_meta.TransferSyntaxUID) == JPEGLSLossless
    monkeypatch.setitem(dd.PREFERRED_PLUGIN, str(JPEGLSLossless), "pyjpegls")
    assert not dd.decodes_in_threads(JPEGLSLossless)
    monkeypatch.setenv("RESUNET_DICOM_WORKERS", "2")
    _fetch_and_compare(orthanc, jpegls_folder, tmp_path)


def test_fetch_of_a_study_with_two_series_brings_both_and_each_reads_like_its_files(orthanc, two_series_folder):
    client = PacsClient(PacsConfig(orthanc.dicomweb))
    study = client.fetch(_study_of(two_series_folder / "a"))
    assert len(study) == 2 * N_TWO and len({rel.split("/")[0] for rel in study.files}) == 2
    for name in ("a", "b"):
        uid = str(pydicom.dcmread(next((two_series_folder / name).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        got, want = load_study(study, series_uid=uid), load_study(two_series_folder / name)
        assert got.meta["series_uid"] == uid
        np.testing.assert_array_equal(np.asarray(got.array), np.asarray(want.array))
        np.testing.assert_array_equal(got.affine, want.affine)


@pytest.fixture(scope="module")
def predictor():
    from resunet.inference.predictor import Predictor

    return Predictor(BUNDLED_MODEL, tta=False)


def _private_pulls(root: Path) -> list[Path]:
    return sorted(root.glob("resunet-pacs-*"))


def test_segment_from_pacs_reads_in_memory_and_stores_the_seg(orthanc, predictor, tmp_path, monkeypatch):
    """The round trip writes no image to disk: no private pull folder appears under the temp dir,
    the record's input hash is that of the study's files, and the SEG arrives in the archive."""
    import tempfile

    from orthanc_support import series_of_modality

    from resunet.inference.batch import BatchOptions
    from resunet.pacs.segment import segment_from_pacs

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    study_uid = _study_of(EXAMPLE_DICOM)
    before = series_of_modality(orthanc, study_uid, "SEG")
    run = segment_from_pacs(PacsClient(PacsConfig(orthanc.dicomweb)), study_uid, predictor,
                            BatchOptions(out_dir=tmp_path / "out", formats=("seg",), progress=False, audit_db=False))
    assert _private_pulls(scratch) == []
    (rec,) = run.batch.records
    assert rec["status"] == "ok" and rec["series_uid"] == str(pydicom.dcmread(
        next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    PacsClient(PacsConfig(orthanc.dicomweb)).retrieve(study_uid, tmp_path / "folder", [rec["series_uid"]])
    assert rec["input"]["sha256"] == sha256_path(tmp_path / "folder")
    assert len(series_of_modality(orthanc, study_uid, "SEG") - before) == 1 and run.stored


def test_a_damaged_instance_fails_the_pull_with_its_name_and_nothing_is_stored(orthanc, damaged_folder, predictor,
                                                                              tmp_path):
    from orthanc_support import series_of_modality

    from resunet.inference.batch import BatchOptions
    from resunet.pacs.segment import segment_from_pacs

    study_uid = _study_of(damaged_folder)
    with pytest.raises(PacsError) as err:
        segment_from_pacs(PacsClient(PacsConfig(orthanc.dicomweb)), study_uid, predictor,
                          BatchOptions(out_dir=tmp_path / "out", formats=("seg",), progress=False, audit_db=False))
    msg = str(err.value)
    assert "could not be segmented" in msg and "pixel data cannot be decoded" in msg and "RLE Lossless" in msg
    damaged = PacsClient(PacsConfig(orthanc.dicomweb)).fetch(study_uid)
    bad = next(rel for rel, data in damaged.files.items()
               if data == sorted(damaged_folder.glob("*.dcm"))[DAMAGED_SLICE].read_bytes())
    assert damaged.label(bad) in msg  # names the instance, so the operator can find it
    assert "Traceback" not in msg
    assert series_of_modality(orthanc, study_uid, "SEG") == set()  # nothing partial went back
    assert not list((tmp_path / "out").glob("*.dcm"))  # and no output was left


def _body(data: bytes) -> bytes:
    """A DICOM file's data set bytes: what follows the preamble, ``DICM`` and the group 2 meta."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little"):]


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (scripts/setup-system.sh installs it)")
def test_dicom_node_keeps_a_compressed_series_as_received(rle_folder, tmp_path):
    """dcmtk's storescu sends the RLE series in RLE; the node stores each data set byte for byte."""
    from resunet.pacs import ListenerConfig, StoreListener

    got: list = []
    port = free_port()
    config = ListenerConfig(ae_title="RESUNET", port=port, incoming_dir=tmp_path / "in", settle_seconds=0.5)
    with StoreListener(config, got.append):
        subprocess.run(["storescu", "-xr", "-aet", "STORESCU", "-aec", "RESUNET", "+sd", "127.0.0.1",
                        str(port), str(rle_folder)], check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(got) == 1 and got[0].n_instances == N_RLE
    stored = sorted(f for f in Path(got[0].folder).rglob("*.dcm"))
    assert len(stored) == N_RLE
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in stored} == {RLELossless}
    assert sorted(_body(f.read_bytes()) for f in stored) == sorted(_body(f.read_bytes()) for f in rle_folder.glob("*.dcm"))
