"""Running the model for the page: a thin layer over :class:`resunet.inference.Predictor`.

No segmentation logic here: the Predictor does preprocessing, sliding-window inference,
post-processing and the inverse mapping onto the input grid, and reports the per-label volumes.
This module only keeps the result together with what the page needs (hashes for the cache key and
for traceability, timing) and writes the downloads with the library's writers.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from resunet.io.volume import Volume

#: One model run at a time per server process: 2 CPU cores are saturated by one run, and a Predictor
#: is shared between sessions through st.cache_resource.
RUN_LOCK = threading.Lock()


@dataclass
class RunResult:
    """One prediction as the page shows it.

    Attributes:
        mask: integer label map on exactly the input grid.
        uncertainty: per-voxel uncertainty on the input grid, or None.
        rows: per foreground label ``{"label", "name", "voxels", "volume_ml"}``.
        seconds: wall time of the model run, s.
        wait_s: the whole wait the user saw for it (from the study's arrival on the server to the drawn
            views: reading, model loading, the run, drawing), s; None when not measured (e.g. a model change).
        model_name, model_sha256, input_sha256: what was run on what.
        downloads: file name -> bytes, filled lazily by the page.
    """

    mask: Volume
    uncertainty: Volume | None
    rows: list[dict[str, Any]]
    seconds: float
    model_name: str
    model_sha256: str
    input_sha256: str
    prediction: Any = None
    downloads: dict[str, bytes] = field(default_factory=dict)
    started_utc: str = ""
    audit_run_id: str | None = None
    wait_s: float | None = None


def make_predictor(model_path: Path, device: str = "auto", tta: bool = False, uncertainty: bool = False) -> Any:
    """A :class:`resunet.inference.Predictor` for ``model_path`` (load once, cache in the page).

    Args:
        tta: mirror test-time augmentation (8 passes in 3D: about 8x slower on CPU).
        uncertainty: also compute the normalised predictive entropy across the TTA passes (implies TTA).
    """
    from resunet.inference import Predictor

    return Predictor(model_path, device=device, tta=tta, uncertainty="tta" if uncertainty else None)


class PredictorCache:
    """Loaded Predictors shared by all sessions of the server process (weights only, no patient data).

    A Predictor is built once per (file, SHA-256, device, options) and warmed up with one prediction
    on a small blank volume: PyTorch's first convolution calls on CPU cost seconds of one-off setup,
    which would otherwise land on the user's first click. :meth:`preload` does both in a background
    thread as soon as the page shows a model, so the click only pays for the real prediction.

    At interpreter exit (:meth:`close`, registered with :mod:`atexit` by the first :meth:`preload`) a
    preload still running is told to skip its warm-up and is joined (it may end with an error then: some
    imports refuse at interpreter shutdown, and nobody asks for that model any more). A daemon thread left
    inside torch (importing it, warming it up) while the interpreter finalised ended the process with
    SIGABRT ("terminate called without an active exception") after the page had done its work.
    """

    #: seconds :meth:`close` waits for a preload at exit (a model load on a busy 2-core CPU takes ~10 s)
    CLOSE_WAIT_S = 120.0

    def __init__(self, max_entries: int = 4) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, Any] = {}
        self._building: dict[tuple, threading.Event] = {}
        self._failed: set[tuple] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._atexit_registered = False
        self.max_entries = max_entries

    def state(self, model_path: Path, sha256: str, device: str, tta: bool, uncertainty: bool) -> str:
        """``"ready"``, ``"loading"``, ``"failed"`` (the last build raised) or ``"absent"``."""
        key = (str(model_path), sha256, device, tta, uncertainty)
        with self._lock:
            if key in self._entries:
                return "ready"
            if key in self._building:
                return "loading"
            return "failed" if key in self._failed else "absent"

    def get(self, model_path: Path, sha256: str, device: str, tta: bool, uncertainty: bool) -> Any:
        key = (str(model_path), sha256, device, tta, uncertainty)
        while True:
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
                event = self._building.get(key)
                if event is None:
                    event = threading.Event()
                    self._building[key] = event
                    break
            event.wait()  # another thread is building it
        try:
            try:
                predictor = make_predictor(model_path, device=device, tta=tta, uncertainty=uncertainty)
                if not self._closing.is_set():  # at exit: no warm-up run to wait for
                    _warm_up(predictor)
            except BaseException:
                with self._lock:
                    self._failed.add(key)
                raise
            with self._lock:
                self._failed.discard(key)
                while len(self._entries) >= self.max_entries:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = predictor
            return predictor
        finally:
            with self._lock:
                self._building.pop(key, None)
            event.set()

    def preload(self, model_path: Path, sha256: str, device: str, tta: bool, uncertainty: bool) -> None:
        """Build and warm up in a background thread (errors surface later, on :meth:`get`)."""
        key = (str(model_path), sha256, device, tta, uncertainty)
        with self._lock:
            if (self._closing.is_set() or key in self._entries or key in self._building
                    or key in self._failed):
                return
            if not self._atexit_registered:
                # atexit, not a non-daemon thread: Python joins non-daemon threads before atexit runs, so
                # the stop flag could not be set first; atexit callbacks run before daemon threads are frozen
                atexit.register(self.close)
                self._atexit_registered = True

        def work() -> None:
            try:
                self.get(model_path, sha256, device, tta, uncertainty)
            except Exception:  # noqa: BLE001 - reported when the page asks for it
                pass
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=work, name="resunet-preload", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self, timeout_s: float | None = None) -> None:
        """Start no more preloads; let running ones skip their warm-up and wait for them (at most
        ``timeout_s`` seconds in all, default :attr:`CLOSE_WAIT_S`). Called at interpreter exit."""
        self._closing.set()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + (self.CLOSE_WAIT_S if timeout_s is None else float(timeout_s))
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


def _warm_up(predictor: Any) -> None:
    """:meth:`Predictor.warm_up` under the run lock (one network run at a time in the web UI)."""
    with RUN_LOCK:
        predictor.warm_up()


PREDICTORS = PredictorCache()


#: Share of the progress bar per Predictor stage (``progress(stage, done, total)``), in order.
STAGES: dict[str, tuple[float, float, str]] = {
    "prepare": (0.0, 0.1, "preparing the scan"),
    "windows": (0.1, 0.9, "running the network"),
    "restore": (0.9, 0.95, "mapping back onto the scan's grid"),
    "postprocess": (0.95, 1.0, "post-processing"),
}


def _progress_adapter(callback: Callable[[float, str], None]) -> Callable[..., None]:
    """Turn ``progress(stage, done, total)`` into one monotone fraction for the page's bar."""

    def cb(stage: str, done: float, total: float) -> None:
        lo, hi, text = STAGES.get(stage, (0.0, 1.0, stage))
        frac = lo + (hi - lo) * (float(done) / float(total) if total else 0.0)
        callback(min(max(frac, 0.0), 1.0), text)

    return cb


def run_prediction(
    predictor: Any,
    volume: Volume,
    *,
    label_names: dict[int, str],
    model_name: str,
    model_sha256: str,
    input_sha256: str,
    progress: Callable[[float, str], None] | None = None,
) -> RunResult:
    """Predict ``volume`` and collect what the page shows."""
    from resunet.reports.provenance import utc_now

    started_utc = utc_now()
    start = time.perf_counter()
    cb = _progress_adapter(progress) if progress else None
    with RUN_LOCK:
        pred = predictor.predict(volume, progress=cb) if cb else predictor.predict(volume)
    seconds = time.perf_counter() - start
    rows = volume_rows(pred, label_names)
    return RunResult(
        mask=pred.mask,
        uncertainty=getattr(pred, "uncertainty", None),
        rows=rows,
        seconds=seconds,
        model_name=model_name,
        model_sha256=model_sha256,
        input_sha256=input_sha256,
        prediction=pred,
        started_utc=started_utc,
    )


def record_prediction(
    result: RunResult,
    input_path: Path,
    model_path: Path,
    outputs: list[Path],
    web_user: str | None,
) -> str:
    """Append the web UI prediction to the audit log (the same log as ``resunet predict``); returns the run id.

    The record holds the provenance (software versions, model and input SHA-256, server user and
    host, times), the signed-in web user when a login is configured, the volumes and settings, and
    the SHA-256 of the written mask files. No patient names: input files are stored under neutral
    names in the session folder.
    """
    from resunet.reports import collect_provenance, record_run

    prov = collect_provenance(
        command=["resunet", "app"],
        files={"input": [input_path]},
        model_path=model_path,
        model_name=result.model_name,
        started_utc=result.started_utc or None,
    )
    prov["web_user"] = web_user
    pred = result.prediction
    prov["prediction"] = {
        "volumes_ml": dict(pred.volumes_ml),
        "voxel_counts": dict(pred.voxel_counts),
        "settings": dict(pred.settings),
        "device": pred.device,
        "seconds": round(result.seconds, 3),
        "warnings": list(pred.warnings),
    }
    return record_run("predict", prov, outputs)


def volume_rows(pred: Any, label_names: dict[int, str]) -> list[dict[str, Any]]:
    """Per-label rows from the Prediction's own ``volumes_ml`` and ``voxel_counts`` (keyed by label name)."""
    rows = []
    for lab, name in sorted(label_names.items()):
        if lab == 0:
            continue
        rows.append(
            {
                "label": int(lab),
                "name": name,
                "voxels": int(pred.voxel_counts.get(name, 0)),
                "volume_ml": float(pred.volumes_ml.get(name, 0.0)),
            }
        )
    return rows
