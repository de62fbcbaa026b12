"""The models shipped in ``resunet/data/model/`` (package data), picked by name (``resunet predict --model brain_tissue``).

A bundled model is a resunet checkpoint ``resunet/data/model/<name>.pt`` with its model card
(``MODEL_CARD*.md`` beside it). :func:`resolve_model` turns a bare name into that file; anything that
looks like a path (an existing file, a suffix, a folder separator) is left as it is, so a local file
called ``brain_tissue`` still wins over the bundled model of that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from resunet.package_data import MODEL_DIR

#: the folder of the bundled checkpoints (package data: resunet/data/model)
BUNDLED_DIR = MODEL_DIR
#: the model used when none is given (``resunet predict`` without --model, ``resunet serve``, the web UI at start)
DEFAULT_MODEL = "brain_extraction"
#: bundled model name -> one line on what it segments (labels come from the checkpoint)
BUNDLED_MODELS: dict[str, str] = {
    "brain_extraction": "brain mask of T1 head MRI (1 = brain)",
    "brain_tissue": "brain tissue of T1 MRI (1 = CSF, 2 = grey matter, 3 = white matter)",
}


def bundled_path(name: str) -> Path:
    """The checkpoint file of bundled model ``name`` (it may be missing from a trimmed install)."""
    return BUNDLED_DIR / f"{name}.pt"


def default_model_path() -> Path:
    """The checkpoint used when no model is given (:data:`DEFAULT_MODEL`): ``resunet predict``, ``resunet serve``."""
    return bundled_path(DEFAULT_MODEL)


def bundled_models() -> dict[str, Path]:
    """Bundled models whose checkpoint is present: name -> file, in :data:`BUNDLED_MODELS` order."""
    return {name: bundled_path(name) for name in BUNDLED_MODELS if bundled_path(name).is_file()}


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """``model`` as a file path: a bundled model's name becomes its checkpoint, a path stays a path.

    Args:
        model: a model file (.pt, .onnx, TorchScript) or the name of a bundled model
            (:data:`BUNDLED_MODELS`).
    """
    path = Path(model)
    text = os.fspath(model)
    if path.exists() or path.suffix or os.sep in text or "/" in text:
        return path
    return bundled_path(text) if text in BUNDLED_MODELS else path
