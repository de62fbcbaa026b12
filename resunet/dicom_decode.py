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


def read_full(path: str | Path | bytes) -> Dataset:
    """Read a whole DICOM file (pixel data included), from its path or from its bytes held in memory;
    preamble-less files (old ACR-NEMA style) are accepted if they carry a SOP class and a series or
    study UID, as the header scan accepts them."""
    from io import BytesIO

    def open_() -> str | BytesIO:
        return BytesIO(path) if isinstance(path, bytes) else str(path)

    try:
        return pydicom.dcmread(open_(), force=False)
    except InvalidDicomError:
        ds = pydicom.dcmread(open_(), force=True)
        if not ("SOPClassUID" in ds and ("SeriesInstanceUID" in ds or "StudyInstanceUID" in ds)):
            raise InvalidDicomError(f"{'an in-memory file' if isinstance(path, bytes) else path}: not a DICOM file") from None
        return ds


#: the pydicom decoder plugin tried first per transfer syntax (then the other installed ones, in
#: pydicom's order). Chosen by the fastest equal-to-SimpleITK decode of a 512x512 int16 CT frame of
#: bench/io_read_speed.py's series, a fresh dcmread per decode, plugins alternating, 8 each (ms, min;
#: bench/results/io_decoders.md):
#:   JPEG lossless SV1 / proc. 14 gdcm 4.2 / 6.9   pylibjpeg-libjpeg 8.1 / 12.0
#:   JPEG 2000 lossless / lossy   pylibjpeg-openjpeg 16.6 / 11.1   gdcm 19.4 / 9.6 (no gain: not used)
#:   JPEG-LS lossless / near      pyjpegls (CharLS) 2.7 / 3.2   gdcm 11.8 / 10.2   pylibjpeg-libjpeg 30 / 34
#:   JPEG baseline (8-bit)        pillow 1.0   pylibjpeg-libjpeg 2.6   gdcm 9.1
#:   JPEG extended (12-bit)       pylibjpeg-libjpeg only (gdcm and pillow refuse 12-bit)
#:   RLE                          pylibjpeg-rle 0.4   pydicom 1.6
#: None of the JPEG decoders releases the GIL (their extension modules never call
#: PyEval_SaveThread; pylibjpeg-rle does), so resunet.io.dicom_pixels decodes in processes.
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.57": "gdcm", "1.2.840.10008.1.2.4.70": "gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.50": "pillow", "1.2.840.10008.1.2.4.51": "pylibjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg",
}
#: plugins that can end the whole process on damaged data: GDCM throws a C++ exception nobody
#: catches on a broken JPEG 2000 codestream (``terminate called after throwing ...``, abort). They
#: run only in decode worker processes (:func:`enter_worker`) and only where they are the preferred
#: plugin; a crash costs that worker and the calling process decodes the file again with the others.
#: Never in the CLI, app or service process.
PROCESS_KILLING_PLUGINS = frozenset({"gdcm"})
#: the first plugin outside worker processes where PREFERRED_PLUGIN's may crash it (next fastest above)
IN_PROCESS_PLUGIN = {ts: "pylibjpeg" for ts, plugin in PREFERRED_PLUGIN.items() if plugin in PROCESS_KILLING_PLUGINS}

_in_worker = False


def enter_worker() -> None:
    """Mark this process as a decode worker (the pool's initializer): crash-prone fast plugins allowed."""
    global _in_worker
    _in_worker = True


def plugin_order(ts: str) -> list[str]:
    """The pydicom plugins to try for transfer syntax ``ts``, in order ([] = pydicom's native decoder)."""
    from pydicom.pixels import get_decoder

    try:
        available = list(get_decoder(ts).available_plugins)
    except (NotImplementedError, ValueError):
        return []
    first = PREFERRED_PLUGIN.get(ts) if _in_worker else IN_PROCESS_PLUGIN.get(ts, PREFERRED_PLUGIN.get(ts))
    order = ([first] if first in available else []) + [p for p in available if p != first]
    # a crash-prone plugin only as a worker's first choice, never as anyone's fallback
    return [p for k, p in enumerate(order) if p not in PROCESS_KILLING_PLUGINS or (_in_worker and k == 0)]


def decoder_plugin(ts: str) -> str:
    """The plugin tried first for ``ts`` in this process ('' = pydicom's native decoder)."""
    order = plugin_order(ts)
    return order[0] if order else ""


def _pixel_array(ds: Dataset, frames: range | None = None) -> np.ndarray:
    """``ds``'s stored values (all frames, or ``frames``), each plugin of :func:`plugin_order` in turn."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    order = plugin_order(ts) if ts else []
    if not order:  # uncompressed, deflated, big endian: pydicom's own decoder
        if frames is None:
            return ds.pixel_array
        order = [""]
    from pydicom.pixels import get_decoder

    error: BaseException | None = None
    for plugin in order:
        try:
            if frames is None:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array
            decoder = get_decoder(ts)
            return np.stack([arr for arr, _ in decoder.iter_array(ds, indices=frames, decoding_plugin=plugin)])
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as err:  # noqa: BLE001 - the next plugin; the last error is reported
            error = err
    assert error is not None
    raise error


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


def decode_file(path: str | bytes, source: str, frames: range | None = None) -> np.ndarray:
    """Read a whole file (its path, or its bytes held in memory) and decode its pixels (all frames, or
    ``frames``) with pydicom (run in worker processes too)."""
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
    """:func:`decode_file` of ``(path, source)`` or ``(path, source, frames)`` (what worker processes run;
    ``path`` may be the file's bytes)."""
    return decode_file(*job)
