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


#: decoder plugin tried first per transfer syntax (pydicom's own order otherwise): for JPEG-LS,
#: pyjpegls (CharLS) decoded a 512x512 16-bit frame in ~22 ms where pylibjpeg-libjpeg took ~77 ms
_PREFERRED_PLUGIN = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}


def _pixel_array(ds: Dataset) -> np.ndarray:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    plugin = _PREFERRED_PLUGIN.get(ts)
    if plugin:
        from pydicom.pixels import get_decoder

        try:
            available = plugin in get_decoder(ts).available_plugins
        except (NotImplementedError, ValueError):
            available = False
        if available:
            try:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            except Exception:  # noqa: BLE001 - let pydicom's own order try the other decoders
                ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


def decode_stored(ds: Dataset, source: str) -> np.ndarray:
    """All frames of a full dataset (pixels read) as ``(frames, rows, cols)`` stored values (pydicom)."""
    try:
        arr = _pixel_array(ds)
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
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim != 3 or arr.shape[0] != n_frames:
        raise InputError(f"{source}: pixel data has shape {arr.shape}, expected {n_frames} greyscale frames")
    return arr


def decode_file(path: str, source: str) -> np.ndarray:
    """Read a whole file and decode its pixels with pydicom (run in worker processes too)."""
    try:
        ds = read_full(path)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise InputError(f"{source}: unreadable DICOM file ({type(err).__name__}); the file may be truncated") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"{source}: the DICOM file ends early (no pixel data); it is truncated, copy it again")
    return decode_stored(ds, source)




def decode_job(job: tuple[str, str]) -> np.ndarray:
    """:func:`decode_file` of ``(path, source)`` (the function worker processes are given)."""
    return decode_file(*job)
