"""Model chains: one model segments the scan, the next segments only what the first found.

The bundled ``brain_tissue`` model was trained on skull-stripped T1 scans; on a whole head it labels
scalp and skull as tissue (its model card). A chain ``brain_extraction -> brain_tissue`` runs
``brain_extraction`` on the scan, sets every voxel outside its foreground to 0 (the background of the
skull-stripped scans the second model was trained on) and runs ``brain_tissue`` on that; the result
is the last model's labels, kept only inside the earlier models' foreground.

:class:`ChainPredictor` has the parts of :class:`~resunet.inference.predictor.Predictor` that the
batch loop, the service and the PACS bridge use (``predict``, ``model``, ``labels``, ``device``,
``plan``, ``patch``, ``settings()``, ``model_records()``), so a chain goes wherever one model goes:
``resunet predict --model brain_extraction --then brain_tissue`` and routing rules with
``model: [brain_extraction, brain_tissue]`` (:mod:`resunet.pacs.routing`).

Hand-written: MONAI has no notion of running one network on another's output; this is the dozen
lines of masking between two of our own predictions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from resunet.errors import ConfigError, InputError
from resunet.io.volume import Volume


@dataclass
class ChainModel:
    """What callers read from ``predictor.model``: the last model's labels and metadata (its label
    codes go into the SEG), a name saying the chain, a sha256 over every step's model."""

    name: str
    sha256: str
    labels: dict[int, str]
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: Any = None


class ChainPredictor:
    """Predictors run in order, each later one on the scan masked by the previous foreground.

    Args:
        steps: two or more Predictors (each with its own settings: TTA, overlap, device).
    """

    def __init__(self, steps: Sequence[Any]) -> None:
        if len(steps) < 2:
            raise ConfigError("a model chain needs at least two models")
        self.steps = list(steps)
        last = self.steps[-1]
        names = [p.model.name for p in self.steps]
        digest = hashlib.sha256("\n".join(p.model.sha256 for p in self.steps).encode()).hexdigest()
        self.model = ChainModel(name=" -> ".join(names), sha256=digest, labels=dict(last.model.labels),
                                kind="chain", meta=dict(getattr(last.model, "meta", {}) or {}))
        self.labels = last.labels
        self.device = last.device
        self.plan = last.plan
        self.patch = last.patch
        self.spatial_dims = last.spatial_dims

    def settings(self) -> dict[str, Any]:
        """The last step's settings plus ``chain``: every step's model and settings, in order."""
        return {**self.steps[-1].settings(),
                "chain": [{"model": p.model.name, "sha256": p.model.sha256, **p.settings()} for p in self.steps]}

    def model_records(self) -> list[dict[str, Any]]:
        """Every step's model records, each with ``step`` (1-based) and ``role``."""
        out = []
        for i, p in enumerate(self.steps, start=1):
            role = "segments the scan" if i == 1 else "segments inside the previous foreground"
            out.extend({**r, "step": i, "role": role} for r in p.model_records())
        return out

    def predict(self, volumes: Volume | Sequence[Volume], *, probabilities: bool = False,
                progress: Any = None, check_content: bool = True) -> Any:
        """Run the chain on one case; the Prediction of the last step, restricted to the earlier
        foregrounds, with every step's timings (``step1_total`` ...) and warnings.

        Raises:
            InputError: an earlier model found nothing, so there is nothing for the next one to segment.
        """
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        keep: np.ndarray | None = None
        timings: dict[str, float] = {}
        warnings: list[str] = []
        for i, step in enumerate(self.steps[:-1], start=1):
            pred = step.predict(vols, probabilities=False, progress=progress, check_content=check_content)
            warnings += [w for w in pred.warnings if w not in warnings]
            timings.update({f"step{i}_{k}": v for k, v in pred.timings.items()})
            fg = np.asarray(pred.mask.array) > 0
            keep = fg if keep is None else keep & fg
            if not keep.any():
                raise InputError(f"{step.model.name} found no foreground in this scan, so there is nothing for "
                                 f"{self.steps[i].model.name} to segment (the chain {self.model.name} stops here)")
            vols = [v.with_array(np.where(keep, v.array, 0).astype(v.array.dtype)) for v in vols]
        assert keep is not None
        last = self.steps[-1].predict(vols, probabilities=probabilities, progress=progress, check_content=check_content)
        n = len(self.steps)
        warnings += [w for w in last.warnings if w not in warnings]
        timings.update({f"step{n}_{k}": v for k, v in last.timings.items()})
        timings["total"] = round(sum(v for k, v in timings.items() if k.endswith("_total")), 4)

        mask = np.where(keep, last.mask.array, 0).astype(last.mask.array.dtype)
        mask_vol = last.mask.with_array(mask)
        vox_ml = mask_vol.voxel_volume_ml
        voxel_counts = {name: int(np.count_nonzero(mask == v)) for v, name in self.labels.items() if v != 0}
        probs = None
        if last.probabilities is not None:
            probs = {k: p.with_array(np.where(keep, p.array, 0).astype(p.array.dtype))
                     for k, p in last.probabilities.items()}
        unc = None if last.uncertainty is None else last.uncertainty.with_array(
            np.where(keep, last.uncertainty.array, 0).astype(last.uncertainty.array.dtype))
        return replace(last, mask=mask_vol, probabilities=probs, uncertainty=unc, voxel_counts=voxel_counts,
                       volumes_ml={k: round(c * vox_ml, 6) for k, c in voxel_counts.items()}, timings=timings,
                       model_name=self.model.name, model_sha256=self.model.sha256, settings=self.settings(),
                       models=self.model_records(), warnings=warnings, device=str(self.device))


def build_predictor(models: Sequence[Any], **predictor_kwargs: Any) -> Any:
    """One Predictor for one model, a :class:`ChainPredictor` for several (each step with the same
    settings, ``predictor_kwargs``)."""
    from resunet.inference.predictor import Predictor

    models = list(models)
    if len(models) == 1:
        return Predictor(models[0], **predictor_kwargs)
    return ChainPredictor([Predictor(m, **predictor_kwargs) for m in models])
