"""Every bad input from issue 2: one clear line, exit code 2, no traceback, nothing left behind.

All cases go through ``resunet convert`` (``resunet.cli.main``) the way a user meets them.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_volume
from pydicom.data import get_testdata_file

from resunet.cli import main
from resunet.io import write_dicom_series, write_nifti


def _convert(capsys, inp: Path, out: Path) -> str:
    code = main(["convert", str(inp), str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("resunet convert: error:")]
    assert len(lines) == 1, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".part" in p.name]  # no half-written temp file
    return lines[0]


def _nifti_bytes(tmp_path: Path, arr: np.ndarray) -> bytes:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "full.nii.gz")
    return (tmp_path / "full.nii.gz").read_bytes()


@pytest.fixture(autouse=True)
def _no_temp_files_left(private_tmpdir):
    """Every test here runs with tempfile pointed at an empty folder that must be empty afterwards."""
    yield
    assert not list(private_tmpdir.iterdir()), "temporary files were left behind"


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d / "result.nii.gz"


def test_truncated_nii_gz(tmp_path, capsys, out, private_tmpdir):
    data = _nifti_bytes(tmp_path, np.arange(20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20))
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    msg = _convert(capsys, tmp_path / "cut.nii.gz", out)
    assert "cut.nii.gz" in msg and "truncated" in msg
    assert not list(private_tmpdir.iterdir())


def test_text_renamed_to_nii_gz(tmp_path, capsys, out):
    (tmp_path / "notes.nii.gz").write_text("patient list\nnot an image\n")
    msg = _convert(capsys, tmp_path / "notes.nii.gz", out)
    assert "notes.nii.gz: not a readable NIfTI file" in msg


def test_gzipped_text_named_nii_gz(tmp_path, capsys, out):
    (tmp_path / "g.nii.gz").write_bytes(gzip.compress(b"hello world, this is not a NIfTI header" * 20))
    assert "g.nii.gz: not a readable NIfTI file" in _convert(capsys, tmp_path / "g.nii.gz", out)


def test_nan_nifti_is_read_with_warning(tmp_path, capsys, caplog):
    arr = np.ones((4, 4, 4), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    assert main(["convert", str(tmp_path / "nan.nii.gz"), str(tmp_path / "o.nii.gz")]) == 0
    assert "1 NaN/inf voxels set to 0" in caplog.text
    assert np.asanyarray(nib.load(tmp_path / "o.nii.gz").dataobj)[1, 2, 3] == 0


def test_4d_nifti_says_how_to_pick_a_volume(tmp_path, capsys, out):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "fmri.nii.gz")
    msg = _convert(capsys, tmp_path / "fmri.nii.gz", out)
    assert "is 4D with 3 volumes" in msg and "fslroi fmri.nii.gz vol0.nii.gz 0 1" in msg


def test_zero_sized_dimension(tmp_path, capsys, out):
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.int16), np.eye(4)), tmp_path / "empty.nii")
    assert "a dimension has size 0" in _convert(capsys, tmp_path / "empty.nii", out)


def test_empty_folder(tmp_path, capsys, out):
    (tmp_path / "empty").mkdir()
    assert "empty: the folder is empty" in _convert(capsys, tmp_path / "empty", out)


def test_folder_with_only_an_sr_report(tmp_path, capsys, out):
    (tmp_path / "sr").mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "sr" / "report.dcm")
    msg = _convert(capsys, tmp_path / "sr", out)
    assert "no image series, only Structured Report (SR) (1 files, 0 image series" in msg


def test_truncated_dicom(tmp_path, capsys, out):
    paths = write_dicom_series(make_volume(shape=(16, 16, 3)), tmp_path / "s")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 200])
    msg = _convert(capsys, tmp_path / "s", out)
    assert "IM00002.dcm: the pixel data cannot be decoded" in msg and "truncated" in msg


def test_truncated_dicom_header(tmp_path, capsys, out):
    paths = write_dicom_series(make_volume(shape=(16, 16, 1)), tmp_path / "s")
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    assert "no image series, only truncated or empty images (no pixel data)" in _convert(capsys, paths[0], out)


def test_random_bytes_named_dcm(tmp_path, capsys, out):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "image.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _convert(capsys, tmp_path / "r" / "image.dcm", out)
    assert "image.dcm: not a DICOM file" in msg
    assert "no DICOM images found (1 files, 0 image series, 1 not DICOM)" in _convert(capsys, tmp_path / "r", out)


def _zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


@pytest.mark.parametrize("evil", ["../evil.dcm", "../../evil.dcm", "/tmp/resunet-evil-abs.dcm", "a/../../evil.dcm"])
def test_zip_slip_is_refused_and_nothing_escapes(tmp_path, capsys, out, private_tmpdir, evil):
    paths = write_dicom_series(make_volume(shape=(8, 8, 2)), tmp_path / "s")
    entries = {"series/" + p.name: p.read_bytes() for p in paths}
    entries[evil] = paths[0].read_bytes()
    z = _zip(tmp_path / "study.zip", entries)
    msg = _convert(capsys, z, out)
    assert "would be written outside the extraction folder" in msg
    assert not list(private_tmpdir.iterdir())  # the private extraction folder was removed
    assert not (tmp_path / "evil.dcm").exists() and not (private_tmpdir / "evil.dcm").exists()
    assert not Path("/tmp/resunet-evil-abs.dcm").exists()


def test_zip_symlink_entry_is_refused(tmp_path, capsys, out, private_tmpdir):
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    assert "is a symbolic link" in _convert(capsys, tmp_path / "l.zip", out)
    assert not list(private_tmpdir.iterdir())


def test_zip_bomb_is_refused(tmp_path, capsys, out, private_tmpdir):
    z = _zip(tmp_path / "bomb.zip", {"a.dcm": b"\0" * (16 * 1024 * 1024)})
    assert z.stat().st_size < 50_000
    msg = _convert(capsys, z, out)
    assert "refusing a likely zip bomb" in msg
    assert not list(private_tmpdir.iterdir())


def test_zip_total_size_cap(tmp_path, private_tmpdir):
    from resunet.errors import InputError
    from resunet.io.archive import extract_zip

    z = _zip(tmp_path / "big.zip", {f"f{i}.bin": os.urandom(40_000) for i in range(5)}, zipfile.ZIP_STORED)
    with pytest.raises(InputError, match="would extract to more than"):
        with extract_zip(z, max_total_bytes=100_000):
            pass
    with pytest.raises(InputError, match="has 5 entries, more than the limit of 4"):
        with extract_zip(z, max_entries=4):
            pass
    assert not list(private_tmpdir.iterdir())


def test_good_zip_reads_like_the_folder_and_cleans_up(tmp_path, capsys, private_tmpdir):
    vol = make_volume(shape=(8, 8, 4))
    paths = write_dicom_series(vol, tmp_path / "s")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in paths:
            zf.write(p, f"study/DICOM/{p.stem}")
    (tmp_path / "study.zip").write_bytes(buf.getvalue())
    assert main(["convert", str(tmp_path / "study.zip"), str(tmp_path / "o.nii.gz")]) == 0
    img = nib.load(tmp_path / "o.nii.gz")
    assert np.array_equal(np.asanyarray(img.dataobj), vol.array)
    assert np.allclose(img.affine, vol.affine, atol=1e-5)
    assert not list(private_tmpdir.iterdir())
    assert "from series" in capsys.readouterr().out


def test_output_not_nifti_and_missing_input(tmp_path, capsys):
    write_nifti(make_volume(), tmp_path / "a.nii.gz")
    assert "output name must end in .nii or .nii.gz" in _convert(capsys, tmp_path / "a.nii.gz", tmp_path / "a.txt")
    assert "no such file or folder" in _convert(capsys, tmp_path / "missing", tmp_path / "b.nii.gz")


def test_truncated_uncompressed_nii(tmp_path, capsys, out):
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.eye(4)), tmp_path / "v.nii")
    data = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "v.nii").write_bytes(data[:1000])
    msg = _convert(capsys, tmp_path / "v.nii", out)
    assert "promises 2352 bytes (shape (10, 10, 10), int16) but the file holds 1000" in msg


def test_damaged_dims_are_refused_before_allocating(tmp_path, capsys, out):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "d.nii")
    raw = bytearray((tmp_path / "d.nii").read_bytes())
    raw[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()  # dim[1:4]: 108 TB of voxels
    (tmp_path / "d.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    assert "the header promises" in _convert(capsys, tmp_path / "d.nii.gz", out)
