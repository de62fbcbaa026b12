"""Several trained models used as one: the ensemble behind ``resunet predict --model A.pt B.pt ...``.

An :class:`EnsembleModel` holds the member :class:`~resunet.inference.model.LoadedModel` objects and
offers the same views the :class:`~resunet.inference.predictor.Predictor` reads from a single model
(plan, labels, channels, patch size, size divisor, name, hash). The Predictor runs every member on
every sliding window (after the same preprocessing, through the same mirror flips) and averages
their softmax probabilities before the windows are blended, so the scan is read, resampled and
written once whatever the number of members.

Members must agree on what the ensemble cannot average away: the preprocessing plan (target spacing
and normalisation), spatial dimensions and slice axis, training patch size, label names and input
channels. The first member's post-processing is used. :func:`check_compatible` refuses anything
else with one line naming the differing member.

Identity: the ensemble's ``sha256`` is the SHA-256 of ``"resunet-ensemble/1"`` and the members'
SHA-256s in order (one per line), so ``resunet predict`` resumes only with the same models in the
same order; every member's own hash is recorded beside it (predictions.json, audit log).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from resunet.errors import ModelError
from resunet.inference.model import LoadedModel, load_model
from resunet.preprocess import PreprocessPlan

#: first line of the text whose SHA-256 names an ensemble
ENSEMBLE_TAG = "resunet-ensemble/1"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".ts", ".torchscript", ".jit")


def looks_like_model(value: str | os.PathLike[str]) -> bool:
    """Whether a ``--model`` value names a model: a model file suffix, a bundled model's name, or a run
    folder (``best.pt`` or ``fold_*/best.pt`` inside)."""
    from resunet.inference.bundled import BUNDLED_MODELS

    p = Path(value)
    if os.fspath(value) in BUNDLED_MODELS or p.suffix.lower() in MODEL_SUFFIXES:
        return True
    if p.is_dir():
        return (p / "best.pt").is_file() or any(_FOLD_DIR.match(d.name) for d in p.iterdir() if d.is_dir())
    return False


def split_model_args(models: Sequence[str], inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--model`` takes several values, so ``--model A.pt scan.nii.gz`` would swallow the scan.

    The first value is always a model; later values that do not look like a model
    (:func:`looks_like_model`) are inputs written after ``--model`` and are moved to the inputs, so both
    ``resunet predict scan --model A.pt`` and ``resunet predict --model A.pt scan`` work.

    Returns:
        ``(models, inputs)``.
    """
    kept = [models[0], *(m for m in models[1:] if looks_like_model(m))]
    moved = [m for m in models[1:] if not looks_like_model(m)]
    return kept, [*inputs, *moved]


def expand_model_args(models: Sequence[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    """Model arguments with run folders replaced by their checkpoints.

    A folder written by ``resunet train --fold all`` (``fold_0/best.pt``, ``fold_1/best.pt``, ...)
    becomes its fold checkpoints in fold order; a single-run folder (``best.pt``) becomes that file.
    Anything else is passed on unchanged (files, or names :func:`load_model` resolves).

    Raises:
        ModelError: a folder holds neither.
    """
    out: list[str | os.PathLike[str]] = []
    for m in models:
        p = Path(m)
        if not p.is_dir():
            out.append(m)
            continue
        folds = sorted(
            (int(_FOLD_DIR.match(d.name).group(1)), d / "best.pt")  # type: ignore[union-attr]
            for d in p.iterdir() if d.is_dir() and _FOLD_DIR.match(d.name) and (d / "best.pt").is_file()
        )
        if folds:
            out.extend(path for _, path in folds)
        elif (p / "best.pt").is_file():
            out.append(p / "best.pt")
        else:
            raise ModelError(
                f"{p}: a folder without fold_*/best.pt or best.pt; pass checkpoint files, or the run folder "
                "of `resunet train --fold all`"
            )
    return out


def ensemble_sha256(member_hashes: Sequence[str]) -> str:
    """The ensemble's identity: SHA-256 of :data:`ENSEMBLE_TAG` and the members' hashes, one per line."""
    text = "\n".join([ENSEMBLE_TAG, *member_hashes]) + "\n"
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _label(m: LoadedModel) -> str:
    return str(m.path) if m.path is not None else m.name


def _signature(m: LoadedModel) -> dict[str, Any]:
    """What members must share, with readable values (compared key by key)."""
    plan = m.plan
    return {
        "preprocessing plan (spacing, normalisation)": PreprocessPlan.from_dict(plan).to_dict(),
        "spatial dimensions": int(m.spatial_dims),
        "slice axis": plan.get("slice_axis") if int(m.spatial_dims) == 2 else None,
        "patch size": list(m.patch_size) if m.patch_size else None,
        "labels": {int(k): v for k, v in m.labels.items()},
        "input channels": m.channels,
    }


def check_compatible(members: Sequence[LoadedModel]) -> None:
    """Raise :class:`ModelError` unless every member shares the first member's plan, labels and channels."""
    first = _signature(members[0])
    for m in members[1:]:
        sig = _signature(m)
        for key, value in first.items():
            if sig[key] != value:
                raise ModelError(
                    f"model {_label(m)} cannot join an ensemble with {_label(members[0])}: its {key} differs "
                    f"({sig[key]} vs {value}); ensemble only models trained with the same plan and labels "
                    "(e.g. the folds of one `resunet train --fold all` run)"
                )


@dataclass
class EnsembleModel:
    """Several :class:`LoadedModel` members that predict as one (see the module docstring).

    Attributes:
        members: the models, in the order given (the first one's metadata and post-processing are used).
    """

    members: list[LoadedModel]

    kind = "ensemble"
    path = None

    @classmethod
    def load(cls, models: Sequence[Any]) -> "EnsembleModel":
        """Load each model (paths, Checkpoints or LoadedModels) and check that they fit together."""
        members = [m if isinstance(m, LoadedModel) else load_model(m) for m in models]
        if len(members) < 2:
            raise ModelError("an ensemble needs at least two models")
        check_compatible(members)
        return cls(members)

    # -- the views a single model offers ------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return ensemble_sha256([m.sha256 for m in self.members])

    @property
    def name(self) -> str:
        return f"ensemble of {len(self.members)}: " + ", ".join(m.name for m in self.members)

    @property
    def meta(self) -> dict[str, Any]:
        return self.members[0].meta

    @property
    def plan(self) -> dict[str, Any]:
        return self.members[0].plan

    @property
    def labels(self) -> dict[int, str]:
        return self.members[0].labels

    @property
    def channels(self) -> list[str]:
        return self.members[0].channels

    @property
    def patch_size(self) -> tuple[int, ...] | None:
        return self.members[0].patch_size

    @property
    def spatial_dims(self) -> int:
        return int(self.members[0].spatial_dims)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per axis, the least common multiple of the members' divisors (windows fit every member)."""
        divs = [tuple(m.size_divisor) for m in self.members if m.size_divisor]
        if not divs:
            return ()
        n = max(len(d) for d in divs)
        divs = [d * n if len(d) == 1 else d for d in divs]
        return tuple(math.lcm(*(int(d[i]) for d in divs)) for i in range(n))

    @property
    def has_dropout(self) -> bool:
        return all(m.has_dropout for m in self.members)

    # -- running --------------------------------------------------------------------------------------
    def to(self, device: torch.device) -> "EnsembleModel":
        for m in self.members:
            m.to(device)
        return self

    def set_mc_dropout(self, on: bool) -> None:
        for m in self.members:
            m.set_mc_dropout(on)

    def forward_fns(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One ``f(x) -> logits`` per member."""
        return [m.forward_fn() for m in self.members]

    def member_records(self) -> list[dict[str, Any]]:
        """``[{"name", "sha256", "path", "kind"}]`` per member, for predictions.json and the audit log."""
        return [
            {"name": m.name, "sha256": m.sha256, "path": str(m.path) if m.path is not None else None, "kind": m.kind}
            for m in self.members
        ]


__all__ = ["ENSEMBLE_TAG", "EnsembleModel", "check_compatible", "ensemble_sha256", "expand_model_args"]
