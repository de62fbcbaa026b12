"""JPEG lossless (process 14, any predictor, and its selection value 1) decoded by imagecodecs'
libjpeg-turbo in threads of the reading process (resunet.dicom_imagecodecs, issue 23 point 1).

Streams are written by libjpeg-turbo's encoder (``imagecodecs.jpeg8_encode(lossless=True)``: every
predictor 1-7, 8/12/16 bits) into DICOM files with pydicom; what resunet reads must equal the encoded
values, pydicom's pylibjpeg-libjpeg plugin (a second decoder) and SimpleITK (GDCM) on the same files.
Damaged streams end as a one-line InputError, or in the next decoder when only imagecodecs refuses them.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import compare_with_sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLossless, JPEGLosslessSV1, generate_uid

import resunet.io.dicom_pixels as pixels
from resunet.dicom_decode import decode_file, plugin_order
from resunet.dicom_imagecodecs import frame_parameters
from resunet.errors import InputError
from resunet.io import load_study

N, ROWS, COLS = 6, 40, 56  # small, and not square (rows/columns swapped would show)


def stored(bits: int, signed: bool, n: int = N) -> np.ndarray:
    """(n, ROWS, COLS) stored values using the whole range of ``bits`` (both signs when ``signed``)."""
    rng = np.random.default_rng(bits * 10 + signed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    y, x = np.mgrid[:ROWS, :COLS]
    ramp = lo + (hi - lo) * ((x + y) / (ROWS + COLS - 2))
    vol = ramp[None] + rng.normal(0, (hi - lo) / 50, (n, ROWS, COLS))
    vol[:, 3, 4], vol[:, 5, 6] = lo, hi  # the extremes
    dtype = np.dtype(f"{'i' if signed else 'u'}{1 if bits <= 8 else 2}")
    return np.clip(np.round(vol), lo, hi).astype(dtype)


def jpeg_lossless(frame: np.ndarray, bits: int, predictor: int) -> bytes:
    """A lossless JPEG (SOF3) stream of one frame's stored values (signed values as their ``bits``-bit
    two's complement pattern, as DICOM stores them)."""
    unsigned = frame.view(frame.dtype.str.replace("i", "u")) & ((1 << bits) - 1)
    return imagecodecs.jpeg8_encode(np.ascontiguousarray(unsigned), lossless=True, predictor=predictor, bitspersample=bits)


def dataset(frames: np.ndarray, bits: int, syntax: str, predictor: int, k: int, uids: tuple[str, str, str]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "ljpeg-test", "Ljpeg^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240101", "120000", 5, k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-20.0, -28.0, 2.0 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = frames.dtype.itemsize * 8, bits, bits - 1
    ds.PixelRepresentation = int(frames.dtype.kind == "i")
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate([jpeg_lossless(f, bits, predictor) for f in frames])
    ds["PixelData"].VR = "OB"
    return ds


def write_series(folder: Path, values: np.ndarray, bits: int, syntax: str, predictor: int) -> list[Path]:
    folder.mkdir()
    uids = (generate_uid(), generate_uid(), generate_uid())
    paths = []
    for k in range(len(values)):
        path = folder / f"im{(k * 5) % len(values):03d}"
        dataset(values[k: k + 1], bits, syntax, predictor, k, uids).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pylibjpeg_values(path: Path) -> np.ndarray:
    """The reference: pydicom's pylibjpeg-libjpeg plugin on the whole file."""
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="pylibjpeg")
    arr = ds.pixel_array
    return arr if arr.ndim == 3 else arr[None]


@pytest.fixture
def decode_threads(monkeypatch):
    """The names of the threads that ran decode jobs; fails the test if a worker pool is started."""
    names: list[str] = []
    real = pixels.decode_job

    def recording(job):
        names.append(threading.current_thread().name)
        return real(job)

    def no_pool(*_args):
        raise AssertionError("a decode worker pool was started for JPEG lossless")

    monkeypatch.setattr(pixels, "decode_job", recording)
    monkeypatch.setattr(pixels, "_start_pool", no_pool)
    monkeypatch.setenv("RESUNET_DICOM_WORKERS", "2")
    return names


CASES = [  # (syntax, bits stored, signed, predictor)
    (JPEGLosslessSV1, 16, True, 1), (JPEGLosslessSV1, 16, False, 1), (JPEGLosslessSV1, 12, True, 1),
    (JPEGLosslessSV1, 12, False, 1), (JPEGLosslessSV1, 8, False, 1),
    *[(JPEGLossless, 16, True, p) for p in range(1, 8)],
    *[(JPEGLossless, 12, False, p) for p in (2, 5, 7)], *[(JPEGLossless, 8, False, p) for p in (3, 4, 6)],
    (JPEGLossless, 12, True, 6),
]


@pytest.mark.parametrize("syntax,bits,signed,predictor", CASES,
                         ids=[f"{s.name.split()[-1].strip('[]')}-{b}bit-{'s' if g else 'u'}-p{p}" for s, b, g, p in CASES])
def test_series_equals_the_encoded_values_pylibjpeg_and_simpleitk(tmp_path, decode_threads, syntax, bits, signed, predictor):
    values = stored(bits, signed)
    paths = write_series(tmp_path / "s", values, bits, syntax, predictor)
    assert frame_parameters(pydicom.encaps.generate_frames(pydicom.dcmread(paths[0]).PixelData, number_of_frames=1)
                            .__next__())[4] == predictor
    vol = load_study(tmp_path / "s")
    got = np.asarray(vol.array).transpose(2, 1, 0)  # (slice, row, column)
    assert np.array_equal(got, values)
    assert np.array_equal(got[0], pylibjpeg_values(paths[0])[0])
    assert all(name.startswith("resunet-decode") for name in decode_threads) and len(decode_threads) == N
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    same, dist, note = compare_with_sitk(vol, reader.Execute())
    assert same and dist < 1e-3, note


@pytest.mark.parametrize("syntax,predictor", [(JPEGLosslessSV1, 1), (JPEGLossless, 5)])
def test_enhanced_multiframe_file_is_decoded_in_frame_ranges_by_threads(tmp_path, decode_threads, syntax, predictor):
    """One enhanced CT file (highdicom's legacy conversion) whose frames are re-encoded here."""
    import highdicom as hd

    values = stored(16, True, n=24)
    uids = (generate_uid(), generate_uid(), generate_uid())
    legacy = []
    for k in range(len(values)):
        ds = dataset(values[k: k + 1], 16, ExplicitVRLittleEndian, 1, k, uids)
        ds.PixelData = values[k].tobytes()
        ds["PixelData"].VR = "OW"
        legacy.append(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=legacy, series_instance_uid=hd.UID(), series_number=6, sop_instance_uid=hd.UID(),
            instance_number=1)
    frames = mf.pixel_array
    mf.PixelData = encapsulate([jpeg_lossless(f, 16, predictor) for f in frames])
    mf["PixelData"].VR = "OB"
    mf.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "mf.dcm"
    mf.save_as(path, enforce_file_format=True)
    vol = load_study(path)
    assert np.array_equal(np.asarray(vol.array).transpose(2, 1, 0), values)
    assert np.array_equal(pylibjpeg_values(path), frames)
    assert len(decode_threads) == 8 and set(decode_threads) <= {"resunet-decode_0", "resunet-decode_1"}  # 2 threads x 4 ranges
    same, dist, note = compare_with_sitk(vol, sitk.ReadImage(str(path)))
    assert same and dist < 1e-3, note


def _replace_frame(path: Path, stream: bytes) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([stream])
    ds.save_as(path, enforce_file_format=True)


def test_a_stream_no_decoder_accepts_is_a_one_line_error_naming_the_file(tmp_path, decode_threads):
    values = stored(16, True)
    paths = write_series(tmp_path / "s", values, 16, JPEGLossless, 1)
    good = jpeg_lossless(values[0], 16, 1)
    _replace_frame(paths[3], good[:40] + bytes(8))  # cut inside the header: no scan
    with pytest.raises(InputError) as info:
        load_study(tmp_path / "s")
    assert str(info.value).startswith(f"{paths[3]}: the pixel data cannot be decoded (transfer syntax JPEG Lossless")
    assert "\n" not in str(info.value)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("resunet-decode")]  # the decode threads ended
    assert np.array_equal(np.asarray(load_study(paths[0]).array).transpose(2, 1, 0), values[:1])  # still reads


def test_damaged_streams_raise_in_imagecodecs_never_crash(tmp_path):
    """Random damage to streams of every predictor: libjpeg-turbo decodes or raises, the process lives
    (GDCM aborts on damage of the same kind in JPEG 2000, which is why it never runs in this process)."""
    import random

    rng = random.Random(23)
    raised = 0
    for predictor in range(1, 8):
        good = jpeg_lossless(stored(12, False)[0], 12, predictor)
        for _ in range(40):
            bad = bytearray(good)
            if rng.random() < 0.5:
                bad = bad[: rng.randrange(2, len(bad))]
            else:
                for _ in range(rng.randrange(1, 8)):
                    bad[rng.randrange(2, len(bad))] = rng.randrange(256)
            try:
                imagecodecs.jpeg8_decode(bytes(bad))
            except Exception:  # noqa: BLE001 - any Python exception is what is wanted here
                raised += 1
    assert raised > 0


def test_a_stream_imagecodecs_refuses_is_decoded_by_the_next_plugin_with_the_reason_logged(tmp_path, caplog, decode_threads):
    """A point transform (SOS Al) other than 0: left to pylibjpeg-libjpeg, which handles it."""
    values = stored(16, False)
    paths = write_series(tmp_path / "s", values, 16, JPEGLossless, 1)
    stream = bytearray(jpeg_lossless(values[2], 16, 1))
    sos = stream.index(b"\xff\xda")
    ns = stream[sos + 4]
    stream[sos + 5 + 2 * ns + 2] = 0x02  # Ah = 0, Al (point transform) = 2
    assert frame_parameters(bytes(stream))[5] == 2
    _replace_frame(paths[2], bytes(stream))
    assert plugin_order(JPEGLossless) == ["imagecodecs", "pylibjpeg"]
    with caplog.at_level(logging.INFO, logger="resunet.dicom_decode"):
        vol = load_study(tmp_path / "s")
    got = np.asarray(vol.array).transpose(2, 1, 0)
    assert np.array_equal(got[2], pylibjpeg_values(paths[2])[0])  # pylibjpeg-libjpeg's reading of it
    assert np.array_equal(np.delete(got, 2, axis=0), np.delete(values, 2, axis=0))
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and "decoder imagecodecs refused" in refused[0] and "point transform 2" in refused[0]
    assert "trying pylibjpeg" in refused[0] and paths[2].name not in refused[0]  # no file names (PHI) in logs
    assert np.array_equal(decode_file(str(paths[2]), "x")[0], got[2])
