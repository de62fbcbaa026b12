"""Reading the pixel data of a DICOM series into one preallocated array.

- Uncompressed little-endian data (implicit/explicit VR little endian, 8/16/32-bit, greyscale) is
  read straight from the file into its slice of the volume (``readinto`` at the offset the header
  scan found), in a few threads: no second header parse and no intermediate copy. Unused high bits (BitsStored <
  BitsAllocated) are cleared or sign-extended exactly as pydicom does.
- Everything else (JPEG, JPEG-LS, JPEG 2000, RLE, deflated, big endian, float pixel data, 1-bit)
  is decoded by pydicom with the fastest plugin per transfer syntax
  (:data:`resunet.dicom_decode.PREFERRED_PLUGIN`: imagecodecs, Pillow, pylibjpeg). JPEG lossless,
  JPEG-LS and JPEG 2000 lossless (imagecodecs' libjpeg-turbo, CharLS and OpenJPEG release the GIL)
  and deflated files (zlib releases it) are decoded by threads in this process,
  ``RESUNET_DICOM_WORKERS`` of them (default: the CPU count, at most 8), the frames of a multi-frame
  file in ranges. The other decoders hold the GIL, so with many frames they run in worker processes
  (``forkserver``: safe in threaded programs such as the web app), ``RESUNET_DICOM_WORKERS`` of them (default: the CPU
  count, at most 8; ``1`` decodes in this process): files are spread over the processes, and the
  frames of a multi-frame (enhanced) file are cut into ranges decoded in parallel. Where processes
  cannot be started (daemon processes, sandboxes) the frames are decoded here, one after the other.
  Compressed (encapsulated) files are decoded from the pixel offset the scan found, without parsing
  the header again (:func:`resunet.dicom_decode.decode_encapsulated`); the workers start without
  the main script (:func:`_workers_skip_main`) and write their frames into a shared-memory volume
  (:func:`_shared_volume`) rather than pickling them back.

Measured on 512x512 int16 CT (bench/io_read_speed.py, bench/results/io.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from resunet.dicom_decode import (
    EncapsulatedPixels,
    decode_job,
    decodes_in_threads,
    enter_worker,
    prefers_worker_processes,
    worker_ready,
)
from resunet.errors import InputError

log = logging.getLogger(__name__)

_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)
#: fewer compressed frames than this are decoded in this process (a worker pool costs ~0.1-0.5 s)
MIN_FILES_FOR_PROCESSES = 24
#: a multi-frame file is cut into about this many frame ranges per decode process
RANGES_PER_WORKER = 4
#: threads reading uncompressed files into the volume
READ_THREADS = 4


@dataclass(frozen=True)
class PixelSource:
    """Where and how one file's pixels are stored (all from its header).

    Attributes:
        path: the file.
        source: how to name it in messages.
        offset: byte offset of the top-level pixel data element, or None (unknown).
        transfer_syntax: the TransferSyntaxUID ('' when the file has no meta: implicit VR LE).
        little_endian, implicit_vr: how the data set is encoded.
        n_frames, rows, cols: the frame count and size.
        bits_allocated, bits_stored, signed: the stored integer format.
        float_data: FloatPixelData/DoubleFloatPixelData instead of PixelData (offset is then None).
        data: the whole file's bytes when it is held in memory (:class:`resunet.io.memory.MemoryStudy`;
            ``path`` then only names it), else None (read from ``path``).
        photometric: PhotometricInterpretation (MONOCHROME1/2 for what is read).
    """

    path: str
    source: str
    offset: int | None
    transfer_syntax: str
    little_endian: bool
    implicit_vr: bool
    n_frames: int
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    float_data: bool = False
    photometric: str = "MONOCHROME2"
    data: bytes | None = None

    @property
    def job_input(self) -> str | bytes:
        """What a decode job reads: the file's path, or its bytes when it is held in memory."""
        return self.data if self.data is not None else self.path

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the stored values (what pydicom's pixel_array gives)."""
        if self.bits_allocated == 1:
            return np.dtype(np.uint8)
        if self.float_data:
            return np.dtype(np.float64 if self.bits_allocated == 64 else np.float32)
        size = max(1, (self.bits_allocated + 7) // 8)
        size = 1 if size == 1 else 2 if size == 2 else 4 if size <= 4 else 8
        return np.dtype(f"{'i' if self.signed else 'u'}{size}")

    @property
    def native(self) -> bool:
        """True if the pixels can be read straight from the file (uncompressed little endian)."""
        return (
            self.offset is not None
            and not self.float_data
            and (self.transfer_syntax in _NATIVE_LE or (self.transfer_syntax == "" and self.little_endian))
            and self.bits_allocated in (8, 16, 32)
            and 1 <= self.bits_stored <= self.bits_allocated
        )

    @property
    def frames_apart(self) -> bool:
        """True if the frames are stored apart (an encapsulated transfer syntax: one item per frame)."""
        import pydicom.uid

        return bool(self.transfer_syntax) and pydicom.uid.UID(self.transfer_syntax).is_encapsulated

    @property
    def encapsulated(self) -> EncapsulatedPixels | None:
        """Where the compressed pixel data is, for decoding without parsing the header again (None: the
        file is decoded through a full read: deflated, uncompressed, float data, offset unknown)."""
        if self.offset is None or self.float_data or not self.frames_apart:
            return None
        return EncapsulatedPixels(
            offset=self.offset, transfer_syntax=self.transfer_syntax, rows=self.rows, cols=self.cols,
            n_frames=self.n_frames, bits_allocated=self.bits_allocated, bits_stored=self.bits_stored,
            pixel_representation=1 if self.signed else 0, photometric=self.photometric,
        )


def _read_native(src: PixelSource, out: np.ndarray) -> None:
    """Read all frames of an uncompressed little-endian file into ``out`` (frames, rows, cols)."""
    expected = out.nbytes
    import io

    with (io.BytesIO(src.data) if src.data is not None else open(src.path, "rb")) as fh:
        fh.seek(src.offset)
        head = fh.read(12)
        if len(head) < 8:
            raise InputError(f"{src.source}: the DICOM file ends early (no pixel data); it is truncated, copy it again")
        group, elem = struct.unpack("<HH", head[:4])
        if (group, elem) != _PIXEL_DATA_TAG:
            if group == 0x7FE0:
                raise _NotNative  # float pixel data: pydicom reads it
            raise InputError(f"{src.source}: no pixel data element where the header ends; the file is damaged, copy it again")
        if src.implicit_vr:
            length = struct.unpack("<I", head[4:8])[0]
            fh.seek(src.offset + 8)
        else:
            length = struct.unpack("<I", head[8:12])[0] if len(head) == 12 else 0
            fh.seek(src.offset + 12)
        if length == 0xFFFFFFFF:
            raise _NotNative  # encapsulated data under a native transfer syntax: let pydicom judge
        got = fh.readinto(memoryview(out).cast("B")) if length >= expected else min(length, expected)
    if length < expected or got < expected:
        have = min(length, got)
        raise InputError(
            f"{src.source}: the pixel data cannot be decoded (transfer syntax {_ts_name(src.transfer_syntax)}):"
            f" it holds {have} bytes, less than expected {expected} for {src.n_frames} frame(s) of"
            f" {src.rows}x{src.cols} at {src.bits_allocated} bits; the file may be truncated, copy it again"
        )
    if src.bits_stored < src.bits_allocated:  # unused high bits: the same correction pydicom applies
        shift = src.bits_allocated - src.bits_stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)


class _NotNative(Exception):
    pass


class NeedsWiderType(Exception):
    """A decoder returned values of a type ``out`` cannot hold; read again into ``dtype``."""

    def __init__(self, dtype: np.dtype) -> None:
        super().__init__(str(dtype))
        self.dtype = dtype


def _ts_name(uid: str) -> str:
    import pydicom.uid

    return pydicom.uid.UID(uid).name if uid else "Implicit VR Little Endian (no file meta)"


def _wanted_workers() -> int:
    """``RESUNET_DICOM_WORKERS`` as a number (0: unset, not a number, or not above 0: the default)."""
    env = os.environ.get("RESUNET_DICOM_WORKERS", "").strip()
    if not env:
        return 0
    try:
        return max(0, int(env))
    except ValueError:
        log.warning("RESUNET_DICOM_WORKERS=%r is not a number; using the default", env)
        return 0


def workers_for(n_files: int) -> int:
    """How many processes decode ``n_files`` compressed frames (files or frames of a multi-frame file; 1: in
    this process)."""
    wanted = _wanted_workers()
    if wanted > 0:
        return min(wanted, n_files) if n_files >= 2 else 1
    if n_files < MIN_FILES_FOR_PROCESSES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8, n_files))


def threads_for(n_frames: int) -> int:
    """How many threads decode ``n_frames`` frames whose decoder releases the GIL (1: this thread):
    ``RESUNET_DICOM_WORKERS`` if set, else the CPU count, at most 8 (threads cost no start-up)."""
    wanted = _wanted_workers() or min(os.cpu_count() or 1, 8)
    return max(1, min(wanted, n_frames))


def _decode_in_threads(jobs: Sequence[tuple], threads: int, place: Callable[[int, np.ndarray], None]) -> None:
    """Decode ``jobs`` in ``threads`` threads of this process (decoders that release the GIL), each
    thread handing its job's index and frames to ``place``. The first error (InputError: a damaged
    file) is raised once the jobs already running have ended; the others are not started."""
    if threads <= 1 or len(jobs) <= 1:
        for i in range(len(jobs)):
            place(i, decode_job(jobs[i]))
        return
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> None:
        place(i, decode_job(jobs[i]))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resunet-decode") as pool:
        futures = [pool.submit(run, i) for i in range(len(jobs))]
        try:
            for fut in futures:
                fut.result()
        finally:
            for fut in futures:
                fut.cancel()


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _workers_skip_main() -> Iterator[None]:
    """While worker processes start, have them skip importing the program's main script.

    multiprocessing's ``forkserver`` and ``spawn`` children import the parent's ``__main__`` script
    (as ``__mp_main__``) before running anything, so that functions defined there unpickle. The decode
    jobs need only :mod:`resunet.dicom_decode`, but the ``resunet`` console script imports the whole
    CLI and a benchmark script SimpleITK and resunet.io: about 1 s a worker on this machine, during
    which the worker decodes nothing (a 300-file JPEG-LS series: the second core joined after most of
    the files were done). A ``__main__`` spec named ``__main__`` is what multiprocessing itself skips
    (``spawn._fixup_main_from_name``); it is set only while the processes start, under a lock, and the
    original restored. Hand-written: multiprocessing has no option for it (Python 3.11).
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    import importlib.machinery

    with _MAIN_LOCK:
        spec = getattr(main, "__spec__", None)
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
        try:
            yield
        finally:
            main.__spec__ = spec


def _start_pool(n_proc: int):
    """A ``forkserver`` process pool of ``n_proc`` decode workers, all started now (without the main
    script: :func:`_workers_skip_main`). Raises what multiprocessing raises where processes cannot start."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["resunet.dicom_decode"])
    pool = ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx, initializer=enter_worker)
    try:
        with _workers_skip_main():
            for _ in range(n_proc):  # each submit starts a process while none is idle
                pool.submit(worker_ready)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def _decode_in_processes(jobs: Sequence[tuple], workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode ``jobs`` in ``workers - 1`` processes *and* this one; yields ``(index, array)``, not in order.

    A two-ended queue: this thread decodes jobs from the front at once, a feeder thread starts the
    worker processes and hands them jobs from the back (a few in flight per process), until the two
    meet. Starting the workers (the forkserver, then a fresh interpreter importing pydicom: 0.5-2 s on
    a loaded machine) thus overlaps real work instead of preceding it: with the pool started first, a
    30-file JPEG lossless series took 1.41 s in two processes against 0.60 s in this one alone. A job
    a worker holds but has not finished when this thread gets to it is decoded here too (waiting
    would leave this core idle) and the worker's copy is dropped.
    """
    from concurrent.futures import Future

    lock = threading.Lock()
    bounds = [0, len(jobs)]  # jobs[bounds[0]:bounds[1]] are not taken yet
    given: dict[int, Future | None] = {}  # jobs the feeder took: None until submitted
    stop = threading.Event()
    n_proc = max(1, workers - 1)

    def take(front: bool) -> int | None:
        with lock:
            if bounds[0] >= bounds[1]:
                return None
            if front:
                bounds[0] += 1
                return bounds[0] - 1
            bounds[1] -= 1
            given[bounds[1]] = None
            return bounds[1]

    def feed() -> None:
        pool = None
        try:
            pool = _start_pool(n_proc)
            slots = threading.Semaphore(2 * n_proc)
            while not stop.is_set():
                if not slots.acquire(timeout=0.05):
                    continue
                i = take(front=False)
                if i is None:
                    break
                fut = pool.submit(decode_job, jobs[i])
                fut.add_done_callback(lambda _f: slots.release())
                with lock:
                    given[i] = fut
        except Exception as err:  # noqa: BLE001 - no processes here (daemon, sandbox): this thread decodes all
            log.debug("decode processes unavailable (%s: %s); decoding here", type(err).__name__, err)
        finally:
            stop.wait()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    feeder = threading.Thread(target=feed, name="resunet-dicom-feed", daemon=True)
    feeder.start()
    try:
        while (i := take(front=True)) is not None:
            yield i, decode_job(jobs[i])
        with lock:
            theirs = sorted(given.items())
        for i, fut in theirs:
            if fut is None or not fut.done():
                if fut is not None:
                    fut.cancel()
                yield i, decode_job(jobs[i])
                continue
            try:
                arr = fut.result()
            except InputError:
                raise
            except Exception as err:  # noqa: BLE001 - broken pool (worker killed, no processes): decode here
                log.debug("decode process failed (%s: %s); decoding here", type(err).__name__, err)
                arr = decode_job(jobs[i])
            yield i, arr
    finally:
        stop.set()


def _decode_in_pool(jobs: Sequence[tuple], workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode ``jobs`` in ``workers`` processes only, in order; what a crashed pool left is decoded here.

    For the syntaxes whose fastest decoder (GDCM) may only run in workers (JPEG lossless): this
    process would decode with a plugin about 2x slower (pylibjpeg-libjpeg 8.1 ms a 512x512 SV1 frame
    against GDCM's 4.2 ms), so it leaves the work to them.
    """
    chunk = max(1, len(jobs) // (workers * 4))
    done = 0
    try:
        with _start_pool(workers) as pool:
            for i, arr in enumerate(pool.map(decode_job, jobs, chunksize=chunk)):
                done = i + 1
                yield i, arr
        return
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - no processes (daemon, sandbox) or a worker died (GDCM abort)
        log.debug("decoding in %d processes failed (%s: %s); decoding here", workers, type(err).__name__, err)
    for i in range(done, len(jobs)):
        yield i, decode_job(jobs[i])


def decode_files(jobs: Sequence[tuple], n_frames: int | None = None,
                 workers_only: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Decode ``(path, source)`` files (or ``(path, source, range of frames)``) with pydicom; yields
    ``(index, (frames, rows, cols) array)``, not necessarily in index order.

    In worker processes beside this one when there are many frames (``n_frames``, default one per
    job; see the module docstring), else here; ``workers_only``: in worker processes alone (the
    fastest decoder of these files may only run there).

    Raises:
        InputError: a file cannot be decoded.
    """
    workers = workers_for(len(jobs) if n_frames is None else n_frames)
    if workers > 1:
        yield from (_decode_in_pool if workers_only else _decode_in_processes)(jobs, workers)
        return
    for i in range(len(jobs)):
        yield i, decode_job(jobs[i])


def read_pixels(sources: Sequence[PixelSource], out: np.ndarray, plane_of: Sequence[Sequence[int]]) -> list[int]:
    """Fill ``out`` (K, rows, cols) with the stored values of ``sources``.

    Args:
        sources: one per file.
        out: the preallocated array, dtype able to hold every file's values.
        plane_of: for each source, the slice index ``k`` in ``out`` of each of its frames
            (``-1``: frame not used).

    Returns:
        The indices of the sources whose values were read through pydicom (for logging).

    Raises:
        InputError: unreadable, truncated or undecodable pixel data (naming the file).
        NeedsWiderType: a decoder gave a type ``out`` cannot hold; allocate that type and call again.
    """
    rows, cols = out.shape[1:]

    def read_one(n: int) -> bool:
        """Read source ``n`` in place; False if pydicom must decode it."""
        src = sources[n]
        ks = list(plane_of[n])
        contiguous = bool(ks) and ks[0] >= 0 and src.dtype == out.dtype and ks == list(range(ks[0], ks[0] + len(ks)))
        try:
            if contiguous:
                _read_native(src, out[ks[0]: ks[0] + len(ks)])
            else:
                buf = np.empty((src.n_frames, rows, cols), dtype=src.dtype)
                _read_native(src, buf)
                for f, k in enumerate(ks):
                    if k >= 0:
                        out[k] = buf[f]
        except _NotNative:
            return False
        except OSError as err:
            raise InputError(f"{src.source}: cannot read the file ({err.strerror or err})") from None
        return True

    native = [n for n, src in enumerate(sources) if src.native]
    decoded = [n for n, src in enumerate(sources) if not src.native]
    # Threads: the reads release the GIL, and the first touch of each page of a fresh ``out``
    # (a page fault per 4 kB) is what a big series spends its time on; measured on this 2-core VM,
    # 1000 slices of 512x512 int16: 3.7-7.0 s in one thread, 0.8-0.9 s in four.
    if len(native) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(native)), thread_name_prefix="resunet-dicom") as pool:
            ok = list(pool.map(read_one, native))
    else:
        ok = [read_one(n) for n in native]
    decoded += [n for n, good in zip(native, ok) if not good]
    decoded.sort()
    if decoded:
        if all(decodes_in_threads(sources[n].transfer_syntax) for n in decoded):
            n_frames = sum(max(1, sources[n].n_frames) for n in decoded)
            threads = threads_for(n_frames)
            jobs, owner, _ = _decode_jobs(sources, decoded, threads)
            # each thread puts its frames into ``out`` too: the first touch of a fresh volume's pages
            # (page faults) then is spread over the threads, as for uncompressed files above (one
            # thread copying 300 frames took 1.3 s of a 2.6 s read at load 6)
            _decode_in_threads(jobs, threads, lambda i, arr: _place(i, arr, jobs, owner, sources, plane_of, out, None))
            return decoded
        jobs, owner, n_frames = _decode_jobs(sources, decoded)
        workers_only = any(prefers_worker_processes(sources[n].transfer_syntax) for n in decoded)
        with _shared_volume(out, workers_for(n_frames) > 1) as shared:
            if shared is not None:  # worker processes write their frames straight into it
                name = shared[0]
                jobs = [(*job, (name, out.shape, out.dtype.str, tuple(plane_of[n][first: first + _job_frames(job, sources[n])])))
                        for job, (n, first) in zip(jobs, owner)]
            _collect(decode_files(jobs, n_frames, workers_only), jobs, owner, sources, plane_of, out,
                     shared[1] if shared is not None else None)
    return decoded


def _job_frames(job: tuple, src: PixelSource) -> int:
    """How many frames decode job ``job`` of ``src`` gives."""
    return len(job[2]) if len(job) > 2 and job[2] is not None else max(1, src.n_frames)


@contextlib.contextmanager
def _shared_volume(out: np.ndarray, wanted: bool) -> Iterator[tuple[str, np.ndarray] | None]:
    """A shared-memory array shaped like ``out`` that decode workers write into (multiprocessing's
    SharedMemory, mode 0600, unlinked on exit), with its name; None when not ``wanted`` or /dev/shm
    lacks the room (a container's 64 MB default: a write beyond it would kill the worker with SIGBUS),
    and the workers return their frames through the pipe as before."""
    if not wanted or out.nbytes == 0:
        yield None
        return
    import mmap
    from multiprocessing import shared_memory

    shm = None
    try:
        fs = os.statvfs("/dev/shm")
        if fs.f_bavail * fs.f_frsize < 1.25 * out.nbytes:
            raise OSError("not enough room in /dev/shm")
        shm = shared_memory.SharedMemory(create=True, size=out.nbytes)
        # the view maps the segment a second time, through an mmap it alone keeps alive: SharedMemory.close()
        # unmaps its own mapping even while numpy views of ``shm.buf`` exist (a later read of one crashes
        # the process), so no view of that mapping is handed out
        fd = os.open(f"/dev/shm/{shm.name.lstrip('/')}", os.O_RDWR)
        try:
            view = np.frombuffer(mmap.mmap(fd, out.nbytes), dtype=out.dtype).reshape(out.shape)
        finally:
            os.close(fd)
    except (OSError, ValueError) as err:
        log.debug("no shared memory for the decode workers (%s); frames come back through pipes", err)
        if shm is not None:
            shm.close()
            shm.unlink()
        yield None
        return
    try:
        yield shm.name, view
    finally:
        del view
        shm.close()
        shm.unlink()


def _collect(results: Iterator[tuple[int, np.ndarray | None]], jobs: Sequence[tuple], owner: Sequence[tuple[int, int]],
             sources: Sequence[PixelSource], plane_of: Sequence[Sequence[int]], out: np.ndarray,
             shared: np.ndarray | None) -> None:
    """Put each decode job's frames into their slices of ``out`` (None: a worker wrote them into ``shared``)."""
    for i, arr in results:
        _place(i, arr, jobs, owner, sources, plane_of, out, shared)


def _place(i: int, arr: np.ndarray | None, jobs: Sequence[tuple], owner: Sequence[tuple[int, int]],
           sources: Sequence[PixelSource], plane_of: Sequence[Sequence[int]], out: np.ndarray,
           shared: np.ndarray | None) -> None:
    """Put decode job ``i``'s frames ``arr`` into their slices of ``out`` (None: in ``shared`` already)."""
    rows, cols = out.shape[1:]
    n, first = owner[i]
    src = sources[n]
    if arr is None:
        assert shared is not None
        for k in plane_of[n][first: first + _job_frames(jobs[i], src)]:
            if k >= 0:
                out[k] = shared[k]
        return
    if arr.shape[1:] != (rows, cols):
        raise InputError(f"{src.source}: image size {arr.shape[1:]} differs from {(rows, cols)} of the series")
    if not np.can_cast(arr.dtype, out.dtype, "safe"):
        raise NeedsWiderType(np.result_type(arr.dtype, out.dtype))
    for f in range(arr.shape[0]):
        k = plane_of[n][first + f]
        if k >= 0:
            out[k] = arr[f]


def _decode_jobs(sources: Sequence[PixelSource], decoded: Sequence[int],
                 workers: int | None = None) -> tuple[list[tuple], list[tuple[int, int]], int]:
    """The decode jobs of ``decoded`` sources: one ``(path, source)`` per file, and a multi-frame file cut
    into ``(path, source, range)`` jobs when it would otherwise keep the other processes (or threads:
    ``workers``, default :func:`workers_for` of the frame count) idle.

    Returns (jobs, (source index, first frame) per job, total frames).
    """
    n_frames = sum(max(1, sources[n].n_frames) for n in decoded)
    workers = workers_for(n_frames) if workers is None else workers
    jobs: list[tuple] = []
    owner: list[tuple[int, int]] = []
    for n in decoded:
        src = sources[n]
        frames = max(1, src.n_frames)
        # only encapsulated frames can be decoded apart: a deflated (or big endian, float) multi-frame
        # file is one stream, and each range's job would inflate and parse all of it again (300 deflated
        # 512x512 frames: 6.0 s cut into ranges against 1.9 s for SimpleITK, at load 2)
        if workers > 1 and frames > 1 and src.frames_apart and len(decoded) < workers * RANGES_PER_WORKER:
            # too few files to keep every process busy: RANGES_PER_WORKER frame ranges per process
            step = max(1, -(-frames // (workers * RANGES_PER_WORKER)))
            for first in range(0, frames, step):
                jobs.append((src.job_input, src.source, range(first, min(frames, first + step)), src.encapsulated))
                owner.append((n, first))
        else:
            jobs.append((src.job_input, src.source, None, src.encapsulated))
            owner.append((n, 0))
    return jobs, owner, n_frames
