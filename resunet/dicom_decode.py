"""Decoding one DICOM file's pixel data with pydicom: what worker processes run.

Kept apart from :mod:`resunet.io` so that a worker process imports only pydicom and numpy (about
0.5 s) and not the whole I/O package (nibabel, highdicom, ... several seconds on a loaded machine).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from resunet.errors import InputError

log = logging.getLogger(__name__)


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
#: bench/io_read_speed.py's series, a fresh dcmread per decode, plugins alternating (ms, min;
#: bench/results/io_decoders.md), and, where a plugin releases the GIL (imagecodecs: its files are
#: decoded by threads of the reading process, no worker processes), by whole 300-slice series read
#: both ways, alternating in one process (s, load 7-8):
#:   JPEG lossless SV1 / proc. 14 imagecodecs (libjpeg-turbo 3) 2.5-2.6 (load 6.4-6.8; any predictor,
#:                                8-16 bits)   gdcm 6.0 / 8.8   pylibjpeg-libjpeg 15.7 / 24.0 (same run)
#:   JPEG 2000 lossless           imagecodecs (OpenJPEG) 20.1 vs pylibjpeg-openjpeg 21.5 (load 6.5);
#:                                series 7.1-11.1 s in threads vs 7.8-13.2 s in processes (3 of 3)
#:   JPEG 2000 lossy              pylibjpeg-openjpeg 14.0 vs imagecodecs 13.9 (earlier, idle: 11.1; gdcm 9.6);
#:                                series in threads (imagecodecs) 3.2-3.6 s vs 3.8-4.2 s in processes (5 of 5,
#:                                load 1-2), one enhanced file 3.4-3.9 s vs 3.9-4.4 s
#:   JPEG-LS lossless / near      imagecodecs (CharLS 2.4.3) 4.3 / 3.4 vs pyjpegls (CharLS) 4.3 / 4.9 (load
#:                                6.7); series 1.8-4.1 s in threads vs 3.1-4.4 s in processes (6 of 6)
#:   JPEG baseline (8-bit)        pillow 1.0   pylibjpeg-libjpeg 2.6   gdcm 9.1 (imagecodecs 0.6, the codec
#:                                alone); imagecodecs decodes in threads: 300 slices 0.44-0.46 s against
#:                                0.50-0.67 s with Pillow in processes (idle, alternating; greyscale only)
#:   JPEG extended (12-bit)       imagecodecs (libjpeg-turbo 3, IJG islow IDCT: equal to GDCM) in threads;
#:                                pylibjpeg-libjpeg next (1 off on ~1% of voxels; gdcm and pillow refuse 12-bit)
#:   RLE                          pylibjpeg-rle 0.4   pydicom 1.6
#: imagecodecs releases the GIL while it decodes (resunet.dicom_imagecodecs, registered below). None of
#: the other JPEG decoders does (their extension modules never call PyEval_SaveThread; pylibjpeg-rle
#: does), so resunet.io.dicom_pixels decodes those in processes.
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.57": "imagecodecs", "1.2.840.10008.1.2.4.70": "imagecodecs",
    "1.2.840.10008.1.2.4.90": "imagecodecs", "1.2.840.10008.1.2.4.91": "imagecodecs",
    "1.2.840.10008.1.2.4.80": "imagecodecs", "1.2.840.10008.1.2.4.81": "imagecodecs",
    "1.2.840.10008.1.2.4.50": "imagecodecs", "1.2.840.10008.1.2.4.51": "imagecodecs",
    "1.2.840.10008.1.2.5": "pylibjpeg",
}
#: the first choice where PREFERRED_PLUGIN's is not installed (imagecodecs missing: for JPEG lossless
#: GDCM, the next fastest, in decode worker processes; for JPEG-LS pyjpegls; JPEG 2000 pylibjpeg)
SECOND_PLUGIN = {"1.2.840.10008.1.2.4.57": "gdcm", "1.2.840.10008.1.2.4.70": "gdcm",
                 "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
                 "1.2.840.10008.1.2.4.90": "pylibjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg",
                 "1.2.840.10008.1.2.4.50": "pillow", "1.2.840.10008.1.2.4.51": "pylibjpeg"}
#: plugins that release the GIL while they decode: their files are decoded by threads in this process
GIL_FREE_PLUGINS = frozenset({"imagecodecs"})
#: syntaxes pydicom decodes itself mostly without the GIL: deflated data sets (zlib inflates with the
#: GIL released: about 2.7 ms of a 512x512 slice's 4-5 ms full read); decoded by threads here too
#: (300 slices at load 7: 1.9-2.0 s in threads against 2.1-3.5 s with worker processes)
GIL_FREE_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99"})
#: plugins that can end the whole process on damaged data: GDCM throws a C++ exception nobody
#: catches on a broken JPEG 2000 codestream (``terminate called after throwing ...``, abort). They
#: run only in decode worker processes (:func:`enter_worker`) and only where they are the first
#: choice; a crash costs that worker and the calling process decodes the file again with the others.
#: Never in the CLI, app or service process.
PROCESS_KILLING_PLUGINS = frozenset({"gdcm"})
#: the first plugin outside worker processes where the first choice may crash it (next fastest above)
IN_PROCESS_PLUGIN = {ts: "pylibjpeg" for ts, plugin in {**PREFERRED_PLUGIN, **SECOND_PLUGIN}.items()
                     if plugin in PROCESS_KILLING_PLUGINS}

_in_worker = False


def _register_plugins() -> None:
    """Add resunet's own pydicom decoder plugins (imagecodecs for JPEG lossless) where installed."""
    try:
        from resunet.dicom_imagecodecs import register

        register()
    except (ImportError, ValueError, AttributeError) as err:  # imagecodecs missing or too old: GDCM in workers
        log.debug("imagecodecs decoder plugin not registered (%s)", err)


_register_plugins()


def enter_worker() -> None:
    """Mark this process as a decode worker (the pool's initializer): crash-prone fast plugins allowed."""
    global _in_worker
    _in_worker = True


def _available(ts: str) -> list[str]:
    from pydicom.pixels import get_decoder

    try:
        return list(get_decoder(ts).available_plugins)
    except (NotImplementedError, ValueError):
        return []


def _first_choice(ts: str, available: list[str], in_worker: bool) -> str | None:
    first = PREFERRED_PLUGIN.get(ts)
    if first not in available:
        first = SECOND_PLUGIN.get(ts, first)
    if first in PROCESS_KILLING_PLUGINS and not in_worker:
        first = IN_PROCESS_PLUGIN.get(ts)
    return first


def plugin_order(ts: str) -> list[str]:
    """The pydicom plugins to try for transfer syntax ``ts``, in order ([] = pydicom's native decoder)."""
    available = _available(ts)
    if not available:
        return []
    first = _first_choice(ts, available, _in_worker)
    head = [p for p in dict.fromkeys([first, SECOND_PLUGIN.get(ts)]) if p in available]  # the next fastest second
    order = head + [p for p in available if p not in head]
    # a crash-prone plugin only as a worker's first choice, never as anyone's fallback
    return [p for k, p in enumerate(order) if p not in PROCESS_KILLING_PLUGINS or (_in_worker and k == 0)]


def decodes_in_threads(ts: str) -> bool:
    """True if this process's first plugin for ``ts`` releases the GIL, or pydicom's own decoder mostly
    does (:data:`GIL_FREE_SYNTAXES`): decode its files in threads here."""
    if ts in GIL_FREE_SYNTAXES:
        return True
    order = plugin_order(ts)
    return bool(order) and order[0] in GIL_FREE_PLUGINS


def prefers_worker_processes(ts: str) -> bool:
    """True if the fastest installed plugin for ``ts`` may run only in decode worker processes (GDCM,
    where imagecodecs is missing): this process would decode with a slower one."""
    available = _available(ts)
    return bool(available) and _first_choice(ts, available, True) in PROCESS_KILLING_PLUGINS


def _refused(plugin: str, ts: str, order: list[str], err: BaseException) -> None:
    """Log (no file names: no PHI) that ``plugin`` could not decode a ``ts`` file, and what comes next."""
    later = order[order.index(plugin) + 1:] if plugin in order else []
    reason = " / ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())[:200] or type(err).__name__
    log.info("decoder %s refused a %s frame (%s: %s); %s", plugin or "pydicom", pydicom.uid.UID(ts).name if ts else "?",
             type(err).__name__, reason, f"trying {later[0]}" if later else "no decoder left")


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
            _refused(plugin, ts, order, err)
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
    n_frames = len(frames) if frames is not None else int(ds.get("NumberOfFrames", 1) or 1)
    return _as_frames(np.asarray(arr), n_frames, source)


def _as_frames(arr: np.ndarray, n_frames: int, source: str) -> np.ndarray:
    """``arr`` as ``(frames, rows, cols)``; InputError unless it holds ``n_frames`` greyscale frames."""
    if arr.ndim == 2:
        arr = arr[np.newaxis]
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


class EncapsulatedPixels(NamedTuple):
    """Where a file's encapsulated (compressed) pixel data starts and how it is stored, from the header
    scan, so a decode need not parse the header again (a full ``dcmread`` costs about 1 ms a file on top
    of the decode: 4.3 ms against 3.2 ms a 512x512 JPEG-LS frame, CPU time, this machine).

    Attributes:
        offset: byte offset of the top-level (7FE0,0010) element (its tag) in the file.
        transfer_syntax: the TransferSyntaxUID (an encapsulated one).
        rows, cols, n_frames: frame size (pixels) and count.
        bits_allocated, bits_stored, pixel_representation: the stored integer format.
        photometric: PhotometricInterpretation (greyscale: MONOCHROME1/2).
    """

    offset: int
    transfer_syntax: str
    rows: int
    cols: int
    n_frames: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str


class _NotAsScanned(Exception):
    """The bytes at the scanned offset are not an encapsulated pixel data element."""


def _read_encapsulated(path: str | bytes, spec: EncapsulatedPixels) -> bytes:
    """The value of the pixel data element at ``spec.offset`` (items and sequence delimiter) of the
    file at ``path``, or of the file's bytes when it is held in memory."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        head, data = bytes(path[spec.offset: spec.offset + 12]), memoryview(path)[spec.offset + 12:]
    else:
        with open(path, "rb") as fh:
            fh.seek(spec.offset)
            head = fh.read(12)
            data = fh.read()
    if len(head) < 12:
        raise _NotAsScanned
    group, elem = struct.unpack("<HH", head[:4])
    length = struct.unpack("<I", head[8:12])[0]
    if (group, elem) != (0x7FE0, 0x0010) or head[4:6] not in (b"OB", b"OW") or length != 0xFFFFFFFF:
        raise _NotAsScanned
    # Walk the items to the sequence delimiter, as a full dcmread must: a file cut after its last
    # fragment (no delimiter) is what the full read refuses ("ends early"), so it must not decode
    # here. Hand-written: pydicom's fragment parsers accept a missing delimiter.
    pos = 0
    while True:
        if pos + 8 > len(data):
            raise _NotAsScanned
        tag, item_length = data[pos: pos + 4], int.from_bytes(data[pos + 4: pos + 8], "little")
        if tag == b"\xfe\xff\xdd\xe0":
            items = data[:pos]  # the items; what follows the delimiter is not pixel data
            return items.tobytes() if isinstance(items, memoryview) else items
        if tag != b"\xfe\xff\x00\xe0" or pos + 8 + item_length > len(data):
            raise _NotAsScanned
        pos += 8 + item_length


def decode_encapsulated(path: str | bytes, source: str, spec: EncapsulatedPixels, frames: range | None = None) -> np.ndarray:
    """All frames (or ``frames``) of a file's encapsulated pixel data as ``(frames, rows, cols)`` stored
    values, decoded from the bytes at ``spec.offset`` with the plugins of :func:`plugin_order` (pydicom's
    decoder on a buffer: the same plugins and processing as ``Dataset.pixel_array``, without parsing the
    header again). Anything unexpected (not the element the scan saw, every plugin failing) is decoded
    again through :func:`decode_file`, which names what is wrong with the file."""
    try:
        data = _read_encapsulated(path, spec)
        from pydicom.pixels import get_decoder

        decoder = get_decoder(spec.transfer_syntax)
        opts = dict(
            rows=spec.rows, columns=spec.cols, samples_per_pixel=1, number_of_frames=spec.n_frames,
            bits_allocated=spec.bits_allocated, bits_stored=spec.bits_stored,
            pixel_representation=spec.pixel_representation, photometric_interpretation=spec.photometric,
        )
        arr = None
        order = plugin_order(spec.transfer_syntax) or [""]
        for plugin in order:
            try:
                if frames is None:
                    arr = decoder.as_array(data, decoding_plugin=plugin, **opts)[0]
                else:
                    arr = np.stack([a for a, _ in decoder.iter_array(data, indices=frames, decoding_plugin=plugin, **opts)])
                break
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except BaseException as err:  # noqa: BLE001 - the next plugin; decode_file reports the error
                _refused(plugin, spec.transfer_syntax, order, err)
        if arr is None:
            raise _NotAsScanned
        return _as_frames(np.asarray(arr), len(frames) if frames is not None else spec.n_frames, source)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException:  # noqa: BLE001 - the full read and decode gives the message
        return decode_file(path, source, frames)


#: (shared memory name, volume shape, dtype string, the volume's slice k of each frame of the job, -1: not used)
Sink = tuple[str, tuple[int, ...], str, tuple[int, ...]]
_attached: dict[str, object] = {}  # this worker's mapping of the volume being read (one at a time)


def _write_to_sink(arr: np.ndarray, sink: Sink) -> bool:
    """Write the frames of ``arr`` into their slices of the shared volume ``sink``; False (nothing
    written) if they do not fit it (size, a type it cannot hold): the caller then gets the array."""
    name, shape, dtype, planes = sink
    if arr.shape[1:] != tuple(shape[1:]) or len(planes) != arr.shape[0] or not np.can_cast(arr.dtype, dtype, "safe"):
        return False
    shm = _attached.get(name)
    if shm is None:
        from multiprocessing import shared_memory

        for old in _attached.values():
            old.close()
        _attached.clear()
        # Python 3.11 registers an attach with the resource tracker as if this process owned it; the
        # forkserver's workers share the reading process's tracker, so that is the same entry the
        # reader's unlink() removes (unregistering here made the tracker fail on that unlink)
        shm = shared_memory.SharedMemory(name=name)
        _attached[name] = shm
    out = np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf)
    for f, k in enumerate(planes):
        if k >= 0:
            out[k] = arr[f]
    del out  # no view of the mapping may outlive this call (close() refuses while one exists)
    return True


def decode_job(job: tuple) -> np.ndarray | None:
    """What worker processes run: :func:`decode_file` of ``(path, source)`` or ``(path, source, frames)``,
    :func:`decode_encapsulated` of ``(path, source, frames, spec)``; with a fifth item, a :data:`Sink`,
    a worker process writes the frames into the shared volume and returns None (no 0.5 MB array a
    512x512 int16 frame pickled through a pipe, unpickled and copied again); elsewhere it is ignored."""
    if len(job) >= 4:
        path, source, frames, spec = job[:4]
        arr = decode_encapsulated(path, source, spec, frames) if spec is not None else decode_file(path, source, frames)
        if len(job) == 5 and job[4] is not None and _in_worker and _write_to_sink(arr, job[4]):
            return None
        return arr
    return decode_file(*job)


def worker_ready() -> int:
    """A no-op job: submitting one per worker makes a pool start all its processes at once."""
    return os.getpid()
