"""Running the model for the page: a thin layer over :class:`resunet.inference.Predictor`.

No segmentation logic here: the Predictor does preprocessing, sliding-window inference,
post-processing and the inverse mapping onto the input grid, and reports the per-label volumes.
This module only keeps the result together with what the page needs (hashes for the cache key and
for traceability, timing) and writes the downloads with the library's writers.
"""

from __future__ import annotations

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


def make_predictor(model_path: Path, device: str = "auto") -> Any:
    """A :class:`resunet.inference.Predictor` for ``model_path`` (load once, cache in the page)."""
    from resunet.inference import Predictor

    return Predictor(model_path, device=device)


def _progress_adapter(callback: Callable[[float, str], None]) -> Callable[..., None]:
    """Accept ``progress(done, total)``, ``progress(fraction)`` or ``progress(done, total, text)``."""

    def cb(*args: Any, **kwargs: Any) -> None:
        text = str(kwargs.get("text") or kwargs.get("stage") or "")
        nums = [a for a in args if isinstance(a, (int, float))]
        strs = [a for a in args if isinstance(a, str)]
        if strs and not text:
            text = strs[0]
        if len(nums) >= 2 and nums[1]:
            frac = float(nums[0]) / float(nums[1])
        elif nums:
            frac = float(nums[0])
        else:
            frac = 0.0
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
    )


def volume_rows(pred: Any, label_names: dict[int, str]) -> list[dict[str, Any]]:
    """Per-label table rows from the Prediction's own volumes (mL) and voxel counts."""
    vols = getattr(pred, "volumes_ml", None) or {}
    counts = getattr(pred, "voxel_counts", None) or {}
    labels = sorted({int(k) for k in list(vols) + list(counts)} | {k for k in label_names if k != 0})
    rows = []
    for lab in labels:
        if lab == 0:
            continue
        rows.append(
            {
                "label": lab,
                "name": label_names.get(lab, str(lab)),
                "voxels": int(counts.get(lab, counts.get(str(lab), 0))),
                "volume_ml": float(vols.get(lab, vols.get(str(lab), 0.0))),
            }
        )
    return rows
