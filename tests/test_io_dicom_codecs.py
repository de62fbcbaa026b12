"""Compressed DICOM: every transfer syntax resunet reads, as a series of single-frame files and as one
enhanced multi-frame file, gives the same voxels as SimpleITK (GDCM) and, when lossless, the voxels
that were encoded (issue 23 point 1).

The series have 30 slices, above ``MIN_FILES_FOR_PROCESSES``, so the files are decoded in worker
processes (JPEG lossless: in threads of this process, tests/test_io_jpeg_lossless.py); the
multi-frame file is cut into frame ranges decoded in parallel. Files are encoded by
pydicom's encoders (JPEG 2000, JPEG-LS, RLE, deflate) and by GDCM (python-gdcm) for the JPEG
processes pydicom cannot encode (lossless 14 and SV1, baseline), and by imagecodecs' libjpeg-turbo for
JPEG extended 12-bit (GDCM writes it with 16-bit precision, which no other decoder reads); the
pydicom-data files JPGExtended.dcm and JPEG-lossy.dcm cover it too, in test_io_pydicom_data.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import compare_with_sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from resunet.dicom_decode import PREFERRED_PLUGIN, decoder_plugin
from resunet.errors import InputError
from resunet.io import load_study
from resunet.io.dicom_pixels import MIN_FILES_FOR_PROCESSES, PixelSource, _decode_jobs

N, SIZE = 30, 48

#: name -> (transfer syntax, encoder, lossless, bits stored)
SYNTAXES = {
    "j2k-lossless": (JPEG2000Lossless, "pydicom", True, 16),
    "j2k-lossy": (JPEG2000, "pydicom", False, 16),
    "jls-lossless": (JPEGLSLossless, "pydicom", True, 16),
    "jls-near-lossless": (JPEGLSNearLossless, "pydicom", False, 16),
    "rle": (RLELossless, "pydicom", True, 16),
    "deflate": (DeflatedExplicitVRLittleEndian, "pydicom", True, 16),
    "jpeg-lossless-sv1": (JPEGLosslessSV1, "gdcm", True, 16),
    "jpeg-lossless-14": (JPEGLossless, "gdcm", True, 16),
    "jpeg-baseline": (JPEGBaseline8Bit, "gdcm", False, 8),
    "jpeg-ext12": (JPEGExtended12Bit, "imagecodecs", False, 12),
}


def stored_values(bits: int) -> np.ndarray:
    """(N, SIZE, SIZE) CT-like stored values: signed 16-bit with an air background, or unsigned 8 or
    12-bit (HU + 1024, scaled down by 8 for 8 bits)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    body = (x / 0.42) ** 2 + (y / 0.35) ** 2 < 1
    vol = np.where(body, 40, -1000)[None] + rng.normal(0, 20, (N, SIZE, SIZE)) * body
    vol[:, SIZE // 3: SIZE // 2, SIZE // 3: SIZE // 2] = 900 + 10 * np.arange(N)[:, None, None]
    if bits == 8:
        return np.clip((vol + 1024) / 8, 0, 255).astype(np.uint8)
    if bits == 12:
        return np.clip(np.round(vol) + 1024, 0, 4095).astype(np.uint16)
    return np.round(vol).astype(np.int16)


def base_dataset(k: int, arr: np.ndarray, uids: tuple[str, str, str], bits: int | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "codec-test", "Codec^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20240101", "120000", 3, k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-24.0, -24.0, 2.5 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    signed = arr.dtype.kind == "i"
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    if bits is not None:
        ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = arr.tobytes()
    return ds


def gdcm_transcode(path: Path, syntax: str) -> None:
    """Re-encode ``path`` in place with GDCM (python-gdcm), for the JPEG processes pydicom cannot encode."""
    import gdcm

    ts = {JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1, JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
          JPEGBaseline8Bit: gdcm.TransferSyntax.JPEGBaselineProcess1}[syntax]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(ts))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM could not encode {path} as {syntax.name}"
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(path))
    assert writer.Write(), path


def encode(ds: Dataset, path: Path, syntax: str, encoder: str) -> None:
    """Write ``ds`` (uncompressed) to ``path`` in ``syntax``."""
    arr = ds.pixel_array
    if encoder == "imagecodecs":  # 12-bit lossy JPEG frames (SOF1, precision 12) from libjpeg-turbo 3
        import imagecodecs
        from pydicom.encaps import encapsulate

        frames = arr.reshape(-1, ds.Rows, ds.Columns)
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(f, level=95, bitspersample=ds.BitsStored) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif encoder == "pydicom" and syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    elif encoder == "pydicom":
        opts = {"j2k_cr": [4]} if syntax == JPEG2000 else {"jls_error": 3} if syntax == JPEGLSNearLossless else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.compress(syntax, arr, **opts)
    ds.save_as(path, enforce_file_format=True)
    if encoder == "gdcm":
        gdcm_transcode(path, syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def write_series(folder: Path, name: str) -> np.ndarray:
    syntax, encoder, _, bits = SYNTAXES[name]
    values = stored_values(bits)
    folder.mkdir()
    uids = (generate_uid(), generate_uid(), generate_uid())
    for k in range(N):
        encode(base_dataset(k, values[k], uids, bits), folder / f"im{(k * 7) % N:03d}", syntax, encoder)
    return values


def write_enhanced(path: Path, name: str) -> np.ndarray:
    """One enhanced CT multi-frame file (highdicom's legacy conversion of the series), then encoded."""
    import highdicom as hd

    syntax, encoder, _, bits = SYNTAXES[name]
    values = stored_values(bits)
    uids = (generate_uid(), generate_uid(), generate_uid())
    legacy = [base_dataset(k, values[k], uids, bits) for k in range(N)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=legacy, series_instance_uid=hd.UID(), series_number=4, sop_instance_uid=hd.UID(),
            instance_number=1)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(mf)))
    encode(ds, path, syntax, encoder)
    return values


def _to_bytes(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def check(vol, img: sitk.Image, values: np.ndarray, lossless: bool) -> None:
    same, dist, note = compare_with_sitk(vol, img)
    assert same, f"voxels differ from SimpleITK ({note})"
    assert dist < 1e-3
    # voxel order: array[i, j, k] = pixel (row j, column i) of slice k, k ascending along the normal
    got = np.asarray(vol.array).transpose(2, 1, 0)
    assert got.shape == values.shape
    if lossless:
        assert np.array_equal(got, values)
    else:  # lossy: close to what was encoded
        assert np.abs(got.astype(np.int32) - values).mean() < 0.01 * np.ptp(values)


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_series_of_each_syntax_equals_simpleitk(tmp_path, name):
    values = write_series(tmp_path / "s", name)
    vol = load_study(tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    check(vol, reader.Execute(), values, SYNTAXES[name][2])


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_enhanced_multiframe_of_each_syntax_equals_simpleitk(tmp_path, name):
    values = write_enhanced(tmp_path / "mf.dcm", name)
    vol = load_study(tmp_path / "mf.dcm")
    assert sorted(vol.meta["frames"]) == list(range(N))
    check(vol, sitk.ReadImage(str(tmp_path / "mf.dcm")), values, SYNTAXES[name][2])


def test_series_are_decoded_in_processes_and_a_multiframe_file_in_frame_ranges(monkeypatch):
    assert N >= MIN_FILES_FOR_PROCESSES
    monkeypatch.setenv("RESUNET_DICOM_WORKERS", "2")
    src = PixelSource(path="x.dcm", source="x.dcm", offset=None, transfer_syntax=JPEG2000Lossless,
                      little_endian=True, implicit_vr=False, n_frames=N, rows=SIZE, cols=SIZE, bits_allocated=16,
                      bits_stored=16, signed=True)
    jobs, owner, n_frames = _decode_jobs([src], [0])
    assert n_frames == N and len(jobs) == 8  # 2 processes x 4 ranges
    assert [f for job in jobs for f in job[2]] == list(range(N))
    assert [first for _, first in owner] == [job[2][0] for job in jobs]
    singles = [PixelSource(**{**src.__dict__, "n_frames": 1, "path": f"{k}.dcm"}) for k in range(N)]
    jobs, owner, _ = _decode_jobs(singles, list(range(N)))
    assert jobs == [(f"{k}.dcm", "x.dcm", None, None) for k in range(N)]  # one job per file, whole (offset unknown: full read)


def test_a_deflated_multiframe_file_is_decoded_whole_not_in_frame_ranges(tmp_path, monkeypatch):
    """A deflated data set is one zlib stream: frame ranges would each inflate and parse the whole file
    again. The file is one decode job, and it reads as SimpleITK reads it."""
    monkeypatch.setenv("RESUNET_DICOM_WORKERS", "2")
    values = write_enhanced(tmp_path / "mf.dcm", "deflate")
    vol = load_study(tmp_path / "mf.dcm")
    src = PixelSource(path="x.dcm", source="x.dcm", offset=None, transfer_syntax=DeflatedExplicitVRLittleEndian,
                      little_endian=True, implicit_vr=False, n_frames=N, rows=SIZE, cols=SIZE, bits_allocated=16,
                      bits_stored=16, signed=True)
    jobs, _, _ = _decode_jobs([src], [0])
    assert jobs == [("x.dcm", "x.dcm", None, None)]
    check(vol, sitk.ReadImage(str(tmp_path / "mf.dcm")), values, True)


def _worker_order(ts: str) -> list[str]:
    from resunet.dicom_decode import plugin_order

    return plugin_order(ts)


def test_fastest_kept_decoder_is_chosen_per_syntax():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from resunet.dicom_decode import decodes_in_threads, enter_worker, plugin_order, prefers_worker_processes

    # JPEG lossless: imagecodecs (libjpeg-turbo; releases the GIL) everywhere, decoded by threads here
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=enter_worker) as pool:
        assert pool.submit(_worker_order, JPEGLosslessSV1).result()[0] == "imagecodecs"
        assert pool.submit(_worker_order, JPEGLossless).result()[0] == "imagecodecs"
        assert "gdcm" not in pool.submit(_worker_order, JPEG2000Lossless).result()
    # in this process never GDCM: it aborts the process on a damaged JPEG 2000 stream
    assert "gdcm" not in plugin_order(JPEG2000Lossless) + plugin_order(JPEGLossless) + plugin_order(JPEGBaseline8Bit)
    assert plugin_order(JPEGLosslessSV1) == plugin_order(JPEGLossless) == ["imagecodecs", "pylibjpeg"]
    assert decodes_in_threads(JPEGLosslessSV1) and decodes_in_threads(JPEGLossless)
    assert not prefers_worker_processes(JPEGLossless) and decodes_in_threads(JPEG2000)
    # JPEG 2000: lossless and lossy through imagecodecs' OpenJPEG in threads, pylibjpeg-openjpeg next
    assert plugin_order(JPEG2000Lossless)[:2] == ["imagecodecs", "pylibjpeg"] and decodes_in_threads(JPEG2000Lossless)
    assert plugin_order(JPEG2000)[:2] == ["imagecodecs", "pylibjpeg"]
    # JPEG-LS: imagecodecs' CharLS (releases the GIL), pyjpegls (the same CharLS) next
    assert plugin_order(JPEGLSLossless)[:2] == plugin_order(JPEGLSNearLossless)[:2] == ["imagecodecs", "pyjpegls"]
    assert decodes_in_threads(JPEGLSLossless) and decodes_in_threads(JPEGLSNearLossless)
    # JPEG baseline: imagecodecs' libjpeg-turbo (releases the GIL) in threads, Pillow (the same libjpeg-turbo) next
    assert plugin_order(JPEGBaseline8Bit)[:2] == ["imagecodecs", "pillow"] and decodes_in_threads(JPEGBaseline8Bit)
    assert decoder_plugin(RLELossless) == "pylibjpeg"
    assert decoder_plugin(ExplicitVRLittleEndian) == ""
    assert set(PREFERRED_PLUGIN.values()) <= {"imagecodecs", "pyjpegls", "pillow", "pylibjpeg"}


def test_without_imagecodecs_jpeg_lossless_goes_to_gdcm_in_worker_processes(monkeypatch):
    """Where the first choice is not installed (here: renamed to a plugin pydicom does not have), GDCM
    decodes JPEG lossless in worker processes, and this process falls back to pylibjpeg-libjpeg."""
    import resunet.dicom_decode as dd

    monkeypatch.setitem(dd.PREFERRED_PLUGIN, str(JPEGLossless), "not-installed")
    assert dd.prefers_worker_processes(JPEGLossless) and not dd.decodes_in_threads(JPEGLossless)
    assert dd.plugin_order(JPEGLossless)[0] == "pylibjpeg" and "gdcm" not in dd.plugin_order(JPEGLossless)
    monkeypatch.setattr(dd, "_in_worker", True)
    assert dd.plugin_order(JPEGLossless)[0] == "gdcm"
    assert dd.plugin_order(JPEGLosslessSV1)[0] == "imagecodecs"  # untouched


def test_damaged_file_decoded_by_a_worker_is_a_one_line_error(tmp_path, monkeypatch):
    """A broken JPEG 2000 stream: GDCM aborts the worker that gets it (the workers take files from the
    back of the slice order); this process decodes it again without GDCM and names the file."""
    write_series(tmp_path / "s", "j2k-lossless")
    monkeypatch.setenv("RESUNET_DICOM_WORKERS", "2")
    last = max(tmp_path.joinpath("s").iterdir(),
               key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    ds = pydicom.dcmread(last)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])  # not a codestream
    ds.save_as(last, enforce_file_format=True)
    with pytest.raises(InputError) as info:
        load_study(tmp_path / "s")
    assert f"{last.name}: the pixel data cannot be decoded (transfer syntax JPEG 2000" in str(info.value)
    assert "\n" not in str(info.value)


def _read_in_daemon(folder: str, queue) -> None:  # a daemon process may not start decode workers
    import os

    os.environ["RESUNET_DICOM_WORKERS"] = "2"
    try:
        queue.put(np.asarray(load_study(folder).array))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        queue.put(repr(err))


def test_where_no_worker_process_can_start_this_process_decodes_everything(tmp_path):
    import multiprocessing

    values = write_series(tmp_path / "s", "rle")  # RLE: decoded in worker processes where they can start
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_daemon, args=(str(tmp_path / "s"), queue), daemon=True)
    proc.start()
    got = queue.get(timeout=300)
    proc.join(60)
    assert not isinstance(got, str), got
    assert np.array_equal(got.transpose(2, 1, 0), values)


def _gdcm_decode(path: str) -> None:
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="gdcm")
    ds.pixel_array


def test_gdcm_stays_out_of_this_process_because_a_broken_stream_aborts_it(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from resunet.dicom_decode import decode_job

    write_series(tmp_path / "s", "j2k-lossless")
    bad = tmp_path / "s" / "im000"
    ds = pydicom.dcmread(bad)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    ds.save_as(bad, enforce_file_format=True)
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        with pytest.raises(BrokenProcessPool):  # GDCM: 'terminate called after throwing ...', abort
            pool.submit(_gdcm_decode, str(bad)).result(timeout=300)
    with pytest.raises(InputError, match="im000: the pixel data cannot be decoded"):
        decode_job((str(bad), bad.name))  # here: no GDCM, a one-line error


def _spec_of(path: Path) -> "EncapsulatedPixels":
    """What the header scan records of ``path`` for decoding without a second parse."""
    from resunet.dicom_decode import EncapsulatedPixels
    from resunet.io.dicom_headers import read_header

    ds, offset = read_header(path)
    return EncapsulatedPixels(
        offset=offset, transfer_syntax=str(ds.file_meta.TransferSyntaxUID), rows=ds.Rows, cols=ds.Columns,
        n_frames=int(ds.get("NumberOfFrames", 1) or 1), bits_allocated=ds.BitsAllocated, bits_stored=ds.BitsStored,
        pixel_representation=ds.PixelRepresentation, photometric=ds.PhotometricInterpretation)


@pytest.mark.parametrize("name", sorted(n for n in SYNTAXES if n != "deflate"))
def test_compressed_pixels_decode_from_the_scanned_offset_without_reading_the_header_again(tmp_path, name, monkeypatch):
    """The fast path of every encapsulated syntax (single file, and a frame range of an enhanced file)
    gives what pydicom's full read gives; the full read is made to fail, so no fallback hides a miss."""
    import resunet.dicom_decode as dd

    syntax, encoder, _, bits = SYNTAXES[name]
    values = stored_values(bits)
    one = tmp_path / "one.dcm"
    encode(base_dataset(0, values[0], (generate_uid(), generate_uid(), generate_uid()), bits), one, syntax, encoder)
    write_enhanced(tmp_path / "mf.dcm", name)
    want_one = dd.decode_file(str(one), "one.dcm")
    want_mf = dd.decode_file(str(tmp_path / "mf.dcm"), "mf.dcm", range(3, 9))
    specs = _spec_of(one), _spec_of(tmp_path / "mf.dcm")
    assert PixelSource(path=str(one), source="one.dcm", offset=specs[0].offset, transfer_syntax=syntax, little_endian=True,
                       implicit_vr=False, n_frames=1, rows=SIZE, cols=SIZE, bits_allocated=values.dtype.itemsize * 8, bits_stored=bits,
                       signed=bits == 16).encapsulated == specs[0]

    def no_full_read(*_args):
        raise AssertionError("decoded through a full read")

    monkeypatch.setattr(dd, "decode_file", no_full_read)
    got_one = dd.decode_encapsulated(str(one), "one.dcm", specs[0])
    got_mf = dd.decode_encapsulated(str(tmp_path / "mf.dcm"), "mf.dcm", specs[1], range(3, 9))
    assert got_one.dtype == want_one.dtype and np.array_equal(got_one, want_one)
    assert got_mf.shape == (6, SIZE, SIZE) and np.array_equal(got_mf, want_mf)


def test_a_file_changed_since_the_scan_is_read_in_full_with_its_own_message(tmp_path):
    from resunet.dicom_decode import decode_encapsulated, decode_file

    values = write_series(tmp_path / "s", "jls-lossless")
    path = tmp_path / "s" / "im000"
    spec = _spec_of(path)
    moved = spec._replace(offset=spec.offset - 2)  # e.g. rewritten with a longer header since the scan
    assert np.array_equal(decode_encapsulated(str(path), "im000", moved), decode_file(str(path), "im000"))
    assert np.array_equal(decode_encapsulated(str(path), "im000", moved)[0], values[0])
    path.write_bytes(path.read_bytes()[: spec.offset + 40])  # truncated inside the pixel data
    with pytest.raises(InputError) as full:
        decode_file(str(path), "im000")
    with pytest.raises(InputError) as info:
        decode_encapsulated(str(path), "im000", spec)
    assert str(info.value) == str(full.value) and str(info.value).startswith("im000: ")  # the same message
    assert "\n" not in str(info.value)


MAIN_SCRIPT = '''
import os, sys
with open(sys.argv[2], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
if __name__ == "__main__":
    os.environ["RESUNET_DICOM_WORKERS"] = "2"
    from resunet.io import load_study
    import resunet.io.dicom_pixels as pixels
    vol = load_study(sys.argv[1])
    print(vol.shape, int(vol.array.sum()))
'''


def test_decode_workers_do_not_import_the_main_script(tmp_path):
    """An RLE series is decoded in worker processes beside this one; they must not run the program's
    main script (the resunet console script imports the whole CLI, a benchmark SimpleITK: ~1 s each)."""
    import os
    import subprocess
    import sys

    values = write_series(tmp_path / "s", "rle")
    script, marks = tmp_path / "main_script.py", tmp_path / "imports.txt"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "s"), str(marks)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(int(values.astype(np.int64).sum()))  # the volume was read
    assert marks.read_text().split() == [marks.read_text().split()[0]]  # only the parent ran it


def test_a_decode_worker_writes_its_frames_into_the_shared_volume(tmp_path):
    """With a sink, a worker process writes the decoded frames into their slices of the reader's shared
    memory and returns nothing; frames the shared volume cannot hold (a narrower type) come back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import shared_memory

    from resunet.dicom_decode import decode_file, decode_job, enter_worker

    write_enhanced(tmp_path / "mf.dcm", "jls-lossless")
    want = decode_file(str(tmp_path / "mf.dcm"), "mf.dcm", range(4, 8))  # frames 4..7 (file order)
    spec = _spec_of(tmp_path / "mf.dcm")
    shape = (N + 2, SIZE, SIZE)
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)) * 2)
    try:
        shared = np.ndarray(shape, dtype=np.int16, buffer=shm.buf)
        shared[:] = 0
        planes = (N + 1, -1, 0, 5)  # frames 4..7 -> slices N+1, (unused), 0, 5
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=enter_worker) as pool:
            job = (str(tmp_path / "mf.dcm"), "mf.dcm", range(4, 8), spec, (shm.name, shape, "<i2", planes))
            assert pool.submit(decode_job, job).result(timeout=300) is None
            narrow = pool.submit(decode_job, (*job[:4], (shm.name, shape, "|u1", planes))).result(timeout=300)
        assert np.array_equal(shared[N + 1], want[0]) and np.array_equal(shared[0], want[2])
        assert np.array_equal(shared[5], want[3]) and want.any()
        assert not shared[1:5].any() and not shared[6: N + 1].any()
        assert narrow.dtype == np.int16 and np.array_equal(narrow, want)  # returned, not written
        del shared
    finally:
        shm.close()
        shm.unlink()


def test_the_shared_volume_is_private_removed_after_the_read_and_its_views_stay_valid():
    import os
    import stat

    from resunet.io.dicom_pixels import _shared_volume

    out = np.zeros((3, SIZE, SIZE), dtype=np.int16)
    with _shared_volume(out, True) as (name, shared):
        path = f"/dev/shm/{name.lstrip('/')}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # patient pixels: owner only
        kept = shared[1]
        kept[:] = 7
    assert not os.path.exists(path)
    assert int(kept.sum()) == 7 * SIZE * SIZE  # a view that outlives the block still reads (no unmapped memory)
    with _shared_volume(out, False) as nothing:
        assert nothing is None


def test_deflated_header_is_read_by_inflating_only_the_start_and_equals_pydicoms(tmp_path, monkeypatch):
    """The scan of a deflated file inflates the data set only up to its pixel data (pydicom would
    inflate it all, and the decode inflates it again); the header equals pydicom's, from the file and
    from its bytes in memory, and a damaged deflate stream gets pydicom's own error."""
    import zlib

    import resunet.io.dicom_headers as dh
    from pydicom.data import get_testdata_file

    write_series(tmp_path / "s", "deflate")
    big = tmp_path / "big.dcm"  # 512x512 noise: its pixel data is many inflate steps long
    noise = np.random.default_rng(3).integers(-1000, 2000, (512, 512)).astype(np.int16)
    ds = base_dataset(0, noise, (generate_uid(), generate_uid(), generate_uid()))
    ds.Rows = ds.Columns = 512
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(big, enforce_file_format=True)
    paths = sorted((tmp_path / "s").iterdir()) + [Path(get_testdata_file("image_dfl.dcm")), big]
    inflated: list[int] = []
    real = zlib.decompressobj

    class Counting:  # counts what the scan inflates (zlib itself does the work)
        def __init__(self, *args):
            self._d = real(*args)

        def decompress(self, data):
            out = self._d.decompress(data)
            inflated.append(len(out))
            return out

        def flush(self):
            return self._d.flush()

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    for path in paths:
        inflated.clear()
        ds, offset = dh.read_header(path)
        ref = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds == ref and ds.file_meta == ref.file_meta and offset is None
        assert ds.original_encoding == ref.original_encoding and ds.preamble == ref.preamble
        if path == big:
            assert 0 < sum(inflated) < noise.nbytes / 4  # not the whole pixel data
        assert dh.read_header(path.name, data=path.read_bytes())[0] == ref
    from resunet.dicom_decode import decodes_in_threads

    assert decodes_in_threads(DeflatedExplicitVRLittleEndian)  # zlib inflates without the GIL
    vol = load_study(tmp_path / "s")
    assert np.array_equal(np.asarray(vol.array).transpose(2, 1, 0), stored_values(16))
    broken = paths[0]
    data = broken.read_bytes()
    broken.write_bytes(data[:400] + bytes(200) + data[600:])  # the deflate stream damaged
    monkeypatch.setattr(zlib, "decompressobj", real)
    with pytest.raises(zlib.error):  # as pydicom's read raises: the scan leaves the file aside as corrupt
        pydicom.dcmread(broken, stop_before_pixels=True)
    with pytest.raises(zlib.error):
        dh.read_header(broken)


@pytest.mark.parametrize("name,reference", [("jls-lossless", "pyjpegls"), ("jls-near-lossless", "pyjpegls"),
                                            ("j2k-lossless", "pylibjpeg"), ("j2k-lossy", "pylibjpeg"),
                                            ("jpeg-baseline", "pillow"), ("jpeg-ext12", "pylibjpeg")])
def test_imagecodecs_plugin_equals_the_reference_plugin_and_its_syntaxes_decode_in_threads(tmp_path, name, reference):
    """JPEG-LS, JPEG 2000 and JPEG baseline through imagecodecs (CharLS, OpenJPEG, libjpeg-turbo) give
    pyjpegls' / pylibjpeg-openjpeg's / Pillow's arrays, for an enhanced multi-frame file and a single frame; the syntaxes it is first for decode in
    threads of this process (it releases the GIL). JPEG extended 12-bit: pylibjpeg-libjpeg's IDCT
    rounds differently, within 1 of imagecodecs' (which equals SimpleITK's exactly: the series tests)."""
    from resunet.dicom_decode import decodes_in_threads, plugin_order

    syntax = SYNTAXES[name][0]
    write_enhanced(tmp_path / "mf.dcm", name)
    ds = pydicom.dcmread(tmp_path / "mf.dcm")
    arrays = {}
    for plugin in ("imagecodecs", reference):
        ds.pixel_array_options(decoding_plugin=plugin)
        arrays[plugin] = ds.pixel_array.copy()
    assert arrays["imagecodecs"].dtype == arrays[reference].dtype
    assert arrays[reference].shape == (N, SIZE, SIZE)
    diff = np.abs(arrays["imagecodecs"].astype(np.int64) - arrays[reference])
    assert diff.max() <= (1 if name == "jpeg-ext12" else 0)
    assert decodes_in_threads(syntax) == (plugin_order(syntax)[0] == "imagecodecs")
    assert decodes_in_threads(syntax)


def test_a_colour_jpeg_baseline_file_is_left_to_pillow():
    """imagecodecs' plugin decodes greyscale baseline JPEG only: a colour (YBR_FULL) file is refused by it
    and decoded by Pillow, which applies DICOM's YCbCr rules (pydicom-data's dcmtk-written file)."""
    from pydicom.data import get_testdata_file

    from resunet.dicom_decode import _pixel_array, plugin_order

    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="imagecodecs")
    with pytest.raises(RuntimeError, match="greyscale"):
        ds.pixel_array
    reference = pydicom.dcmread(path)
    reference.pixel_array_options(decoding_plugin="pillow")
    expected = reference.pixel_array
    assert plugin_order(JPEGBaseline8Bit)[0] == "imagecodecs"
    got = _pixel_array(pydicom.dcmread(path))  # resunet's order: imagecodecs refuses, Pillow decodes
    assert np.array_equal(got, expected) and expected.shape == (100, 100, 3)
