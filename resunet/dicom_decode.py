"""Decoding one DICOM file's pixel data with pydicom: what worker processes run.

Kept apart from :mod:`resunet.io` so that a worker process imports only pydicom and numpy (about
0.5 s) and not the whole I/O package (nibabel, highdicom, ... several seconds on a loaded machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from resunet.errors import InputError


def read_full(path: str | Path) -> Dataset:
    """Read a whole DICOM file (pixel data included); preamble-less files (old ACR-NEMA style) are
    accepted if they carry a SOP class and a series or study UID, as the header scan accepts them."""
    try:
        return pydicom.dcmread(str(path), force=False)
    except InvalidDicomError:
        ds = pydicom.dcmread(str(path), force=True)
        if not ("SOPClassUID" in ds and ("SeriesInstanceUID" in ds or "StudyInstanceUID" in ds)):
            raise InvalidDicomError(f"{path}: not a DICOM file") from None
        return ds


#: the pydicom decoder plugin tried first per transfer syntax (pydicom's own order, gdcm first when
#: python-gdcm is installed, is used when it is missing or fails). Chosen by the fastest equal-to-
#: SimpleITK decode of a 512x512 int16 CT frame here (best of 7, ms; bench/results/io.md):
#:   JPEG 2000 lossless / lossy   gdcm 28 / 7.7   pylibjpeg-openjpeg 61 / 18.5   pillow 79 / 19
#:   JPEG lossless SV1 / proc. 14 gdcm 3.2 / 11.8 pylibjpeg-libjpeg 40 / 17.7
#:   JPEG-LS lossless / near      pyjpegls 2.7 / 3.2   gdcm 11.8 / 10.2   pylibjpeg-libjpeg 30 / 34
#:   JPEG baseline (8-bit)        pillow 1.0   pylibjpeg-libjpeg 2.6   gdcm 9.1
#:   JPEG extended (12-bit)       pylibjpeg-libjpeg only (gdcm and pillow refuse 12-bit)
#:   RLE                          pylibjpeg-rle 0.4   pydicom 1.6
#: None of the JPEG decoders releases the GIL (their extension modules never call
#: PyEval_SaveThread; pylibjpeg-rle does), so resunet.io.dicom_pixels decodes in processes.
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.90": "gdcm", "1.2.840.10008.1.2.4.91": "gdcm",
    "1.2.840.10008.1.2.4.57": "gdcm", "1.2.840.10008.1.2.4.70": "gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.50": "pillow", "1.2.840.10008.1.2.4.51": "pylibjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg",
}


def decoder_plugin(ts: str) -> str:
    """The plugin :func:`decode_stored` tries first for transfer syntax ``ts`` ('' = pydicom's order)."""
    plugin = PREFERRED_PLUGIN.get(ts, "")
    if not plugin:
        return ""
    from pydicom.pixels import get_decoder

    try:
        return plugin if plugin in get_decoder(ts).available_plugins else ""
    except (NotImplementedError, ValueError):
        return ""


def _pixel_array(ds: Dataset, frames: range | None = None) -> np.ndarray:
    """``ds``'s stored values (all frames, or ``frames``) with the preferred plugin, else pydicom's order."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    plugin = decoder_plugin(ts)
    if frames is None:
        if plugin:
            try:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            except Exception:  # noqa: BLE001 - let pydicom's own order try the other decoders
                ds.pixel_array_options(decoding_plugin="")
        return ds.pixel_array
    from pydicom.pixels import get_decoder

    decoder = get_decoder(ts)
    for attempt in ([plugin, ""] if plugin else [""]):
        try:
            return np.stack([arr for arr, _ in decoder.iter_array(ds, indices=frames, decoding_plugin=attempt)])
        except Exception:  # noqa: BLE001 - the next attempt (pydicom's order) raises the real error
            if attempt == "":
                raise
    raise AssertionError("unreachable")


def decode_stored(ds: Dataset, source: str, frames: range | None = None) -> np.ndarray:
    """All frames (or ``frames``) of a full dataset (pixels read) as ``(frames, rows, cols)`` stored values."""
    try:
        arr = _pixel_array(ds, frames)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as err:  # noqa: BLE001 - decoder missing, truncated or corrupt stream; the
        # Rust RLE decoder (pyo3) raises PanicException, a BaseException, on corrupt data
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(ts, "name", str(ts))
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        msg = " / ".join(lines)[:400] if lines else type(err).__name__
        raise InputError(
            f"{source}: the pixel data cannot be decoded (transfer syntax {name}): {msg};"
            " the file may be truncated, or re-export it uncompressed"
        ) from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    n_frames = len(frames) if frames is not None else int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim != 3 or arr.shape[0] != n_frames:
        raise InputError(f"{source}: pixel data has shape {arr.shape}, expected {n_frames} greyscale frames")
    return arr


def decode_file(path: str, source: str, frames: range | None = None) -> np.ndarray:
    """Read a whole file and decode its pixels (all frames, or ``frames``) with pydicom (run in worker
    processes too)."""
    try:
        ds = read_full(path)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise InputError(f"{source}: unreadable DICOM file ({type(err).__name__}); the file may be truncated") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"{source}: the DICOM file ends early (no pixel data); it is truncated, copy it again")
    return decode_stored(ds, source, frames)


def decode_job(job: tuple) -> np.ndarray:
    """:func:`decode_file` of ``(path, source)`` or ``(path, source, frames)`` (what worker processes run)."""
    return decode_file(*job)
