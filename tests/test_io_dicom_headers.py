"""The hand-written header parser (resunet.io.dicom_headers._read_plain_header) against pydicom's read.

Every DICOM file of pydicom's and nibabel's test data, and files written here with pydicom, are read
both ways; the data sets must be the same element for element (raw bytes, VR, length, value offset,
converted value), with the same file meta, preamble, encoding and pixel data offset.
"""

from __future__ import annotations

import io
from pathlib import Path

import data_store
import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from resunet.io.dicom_headers import _read_any_header, _read_plain_header, read_header

NIBABEL_DICOM = sorted(str(p) for p in Path(nibabel.__file__).parent.rglob("*.dcm"))
# pydicom's bundled test files and pydicom-data's (installed as the package data_store), listed from
# their folders: get_testdata_files also tries to download, which takes 15 s to fail without internet
PYDICOM_DICOM = sorted(str(p) for p in (Path(pydicom.__file__).parent / "data").rglob("*.dcm"))
PYDICOM_DATA = sorted(str(p) for p in (Path(data_store.__file__).parent / "data").rglob("*.dcm"))


def _reference(path: str | Path, data: bytes | None = None):
    """pydicom's own read (the path read_header took for every file before the parser)."""
    with (io.BytesIO(data) if data is not None else open(path, "rb")) as fh:
        ds = _read_any_header(fh, path)
        return ds, fh.tell()


def _same_element(a, b, where: str) -> None:
    assert a.VR == b.VR, where
    if a.VR == "SQ":
        assert len(a.value) == len(b.value), where
        for n, (x, y) in enumerate(zip(a.value, b.value)):
            _same_dataset(x, y, f"{where}[{n}]")
        return
    assert a.value == b.value, where


def _same_dataset(a: Dataset, b: Dataset, where: str) -> None:
    assert list(a.keys()) == list(b.keys()), where
    for tag in a.keys():
        ra, rb = a._dict[tag], b._dict[tag]  # noqa: SLF001 - the raw elements, before conversion
        if getattr(ra, "is_raw", False) and getattr(rb, "is_raw", False):
            assert tuple(ra) == tuple(rb), f"{where} {tag}"
        _same_element(a[tag], b[tag], f"{where} {tag}")
    assert a.original_encoding == b.original_encoding, where
    assert a._character_set == b._character_set, where  # noqa: SLF001


def _check(path: str | Path, data: bytes | None = None) -> bool:
    """Read ``path`` both ways; True if the parser took the file (else pydicom's read did)."""
    ref, ref_offset = _reference(path, data)
    with (io.BytesIO(data) if data is not None else open(path, "rb")) as fh:
        fast = _read_plain_header(fh, path)
    if fast is None:
        return False
    ds, offset = fast
    assert offset == ref_offset, path
    assert ds.preamble == ref.preamble
    assert ds.filename == ref.filename and ds.fileobj_type == ref.fileobj_type
    assert ds.timestamp == ref.timestamp
    _same_dataset(ds.file_meta, ref.file_meta, f"{path} meta")
    _same_dataset(ds, ref, str(path))
    return True


def test_every_pydicom_and_nibabel_test_file_reads_as_pydicom_reads_it():
    files = [*PYDICOM_DICOM, *PYDICOM_DATA, *NIBABEL_DICOM]
    assert len(files) > 150
    taken = 0
    for f in files:
        try:
            _reference(f)
        except Exception:  # noqa: BLE001 - files pydicom itself refuses: read_header refuses them too
            with pytest.raises(Exception):
                read_header(f)
            continue
        taken += _check(f)
    # most test files are plain: the parser must actually be exercised, not fall back every time
    assert taken > len(files) // 3, (taken, len(files))


def _write(path: Path, syntax: str, sequence_length: str = "defined") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Müller^Jörg"
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([ref])
    ds.Rows, ds.Columns = 4, 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(12, dtype=np.int16).tobytes()
    ds["ReferencedImageSequence"].is_undefined_length = sequence_length == "undefined"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_written_files_with_sequences_and_utf8_read_as_pydicom_reads_them(tmp_path, syntax):
    f = _write(tmp_path / "a.dcm", syntax)
    assert _check(f)
    assert _check(f, f.read_bytes())  # held in memory (MemoryStudy)
    ds, offset = read_header(f)
    assert str(ds.PatientName) == "Müller^Jörg"
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert f.read_bytes()[offset: offset + 4] == b"\xe0\x7f\x10\x00"  # the pixel data tag


def test_what_the_parser_leaves_to_pydicom_is_still_read(tmp_path):
    # undefined-length sequence: pydicom walks it
    f = _write(tmp_path / "u.dcm", ExplicitVRLittleEndian, "undefined")
    with open(f, "rb") as fh:
        assert _read_plain_header(fh, f) is None
    ds, offset = read_header(f)
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert (ds, offset) and offset == _reference(f)[1]
    # explicit VR data under an implicit VR syntax (a writer's mistake): pydicom sees the VRs and reads it
    e = _write(tmp_path / "e.dcm", ExplicitVRLittleEndian)
    e.write_bytes(e.read_bytes().replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00\x00", 1))
    with open(e, "rb") as fh:
        assert _read_plain_header(fh, e) is None
    with pytest.warns(UserWarning, match="found explicit VR"):
        ref = _reference(e)
    assert ref[0].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    with pytest.warns(UserWarning, match="found explicit VR"):
        ds, offset = read_header(e)
    assert offset == ref[1] and str(ds.PatientName) == "Müller^Jörg"
    # a header longer than the first read: read further, same result
    g = tmp_path / "long.dcm"
    src = pydicom.dcmread(_write(tmp_path / "b.dcm", ExplicitVRLittleEndian))
    src.ImageComments = "x" * 100_000
    src.save_as(g)
    assert _check(g)
    # a truncated header: refused both ways alike
    t = tmp_path / "t.dcm"
    t.write_bytes(g.read_bytes()[:5000])
    with open(t, "rb") as fh:
        assert _read_plain_header(fh, t) is None
