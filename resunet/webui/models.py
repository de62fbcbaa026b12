"""The model picker: checkpoints in the configured folder and their model cards.

Cards are read with :func:`resunet.training.checkpoint.load_checkpoint` (``torch.load`` with
``weights_only=True``: nothing in a checkpoint file is executed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from resunet.errors import ResunetError

MODEL_SUFFIXES = (".pt",)


@dataclass
class ModelInfo:
    """What the picker shows about one checkpoint.

    Attributes:
        path: the checkpoint file.
        name: the model card's name, or the file name.
        sha256: SHA-256 of the file (the cache key of results).
        labels: label value -> name, background included.
        card: the model card (intended use, training data, metrics, limitations, ...).
        error: why the file cannot be used, or None.
    """

    path: Path
    name: str
    sha256: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    spacing: list[float] | None = None
    modality: str | None = None
    channels: list[str] = field(default_factory=list)
    error: str | None = None


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files directly in ``folder`` (sorted by name); empty if the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(MODEL_SUFFIXES))


@lru_cache(maxsize=32)
def _describe(path: str, mtime_ns: int, size: int) -> ModelInfo:
    from resunet.training.checkpoint import load_checkpoint

    p = Path(path)
    try:
        ck = load_checkpoint(p)
    except ResunetError as err:
        return ModelInfo(path=p, name=p.name, error=str(err))
    card = dict(ck.model_card or {})
    labels = {int(k): str(v) for k, v in ck.labels.items()}
    spacing = ck.plan.get("spacing") if isinstance(ck.plan, dict) else None
    modality = ck.plan.get("modality") if isinstance(ck.plan, dict) else None
    return ModelInfo(
        path=p, name=str(card.get("name") or p.stem), sha256=ck.sha256, labels=labels, card=card, spacing=spacing,
        modality=str(modality) if modality else None, channels=[str(c) for c in (ck.channels or [])],
    )


#: DICOM modality codes the page spells out.
_MODALITY_NAMES = {"MR": "MRI", "CT": "CT", "PT": "PET", "US": "ultrasound"}


def modality_text(file_modality: str | None, model: ModelInfo | None) -> str:
    """What the page says about the scan's modality: the file's own, else the model's (from its checkpoint's
    plan and channels, e.g. ``T1 MRI (the file does not say; the model's expected input)``), else unknown."""
    if file_modality:
        return str(file_modality)
    if model is not None and not model.error and model.modality:
        kind = _MODALITY_NAMES.get(model.modality.upper(), model.modality)
        channels = " ".join(c for c in model.channels if c and c.upper() != model.modality.upper())
        return f"{(channels + ' ') if channels else ''}{kind} (the file does not say; the model's expected input)"
    return "modality unknown"


def describe_model(path: Path) -> ModelInfo:
    """Model card of ``path`` (cached per file path, modification time and size)."""
    try:
        st = path.stat()
    except OSError:
        return ModelInfo(path=path, name=path.name, error=f"model checkpoint {path} does not exist")
    return _describe(str(path), st.st_mtime_ns, st.st_size)


def option_label(path: Path) -> str:
    """The picker's text for a checkpoint: its name and label names, e.g.
    ``brain_tissue.pt: CSF, grey matter, white matter``."""
    info = describe_model(Path(path))
    names = [v for k, v in sorted(info.labels.items()) if k != 0]
    return f"{info.path.name}: {', '.join(names)}" if names and not info.error else info.path.name


def card_markdown(info: ModelInfo) -> str:
    """The model card as Markdown for the page."""
    if info.error:
        return f"**{info.path.name}** cannot be used: {info.error}"
    lines = [f"**{info.name}** (`{info.path.name}`, SHA-256 `{info.sha256[:12]}…`)"]
    fg = {k: v for k, v in info.labels.items() if k != 0}
    if fg:
        lines.append("- **Labels:** " + ", ".join(f"{k} = {v}" for k, v in sorted(fg.items())))
    if info.spacing:
        lines.append("- **Working spacing:** " + " × ".join(f"{s:g}" if s else "native" for s in info.spacing) + " mm")
    order = ["intended_use", "training_data", "metrics", "limitations", "license", "authors", "version"]
    keys = [k for k in order if k in info.card] + [k for k in info.card if k not in order and k != "name"]
    for key in keys:
        lines += _md_item(key, info.card[key], indent="")
    return "\n".join(lines)


def _md_item(key: str, value: Any, indent: str, depth: int = 0) -> list[str]:
    """One card entry as a Markdown bullet; dicts become nested bullets (two levels), long lists are shortened."""
    title = str(key).replace("_", " ")
    title = title[:1].upper() + title[1:]
    if isinstance(value, dict) and depth < 2:
        out = [f"{indent}- **{title}:**"]
        for k, v in value.items():
            out += _md_item(k, v, indent + "    ", depth + 1)
        return out
    return [f"{indent}- **{title}:** {_fmt(value)}"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        if len(v) > 6:
            return ", ".join(_fmt(x) for x in v[:3]) + f", … ({len(v)} in all)"
        return ", ".join(_fmt(x) for x in v)
    return str(v)
