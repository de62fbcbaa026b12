"""``resunet info MODEL``: print a model's card (checkpoint, ONNX or TorchScript export)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="print a model's card: network, labels, spacing, training data, metrics, hash",
        description="Print the model card of a checkpoint (.pt), an export (.onnx, TorchScript) or a bundled "
        "model given by name (brain_extraction, brain_tissue); --list lists the bundled models.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint, export or bundled model name")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.add_argument("--list", action="store_true", help="list the bundled models (name, labels, file) and exit")
    p.set_defaults(func=run)


def _compact(value: Any, limit: int = 6) -> Any:
    """Long lists shortened to their first and last items with a count, recursively."""
    if isinstance(value, list) and len(value) > limit:
        return [*map(_compact, value[:3]), f"... {len(value) - 4} more ...", _compact(value[-1])]
    if isinstance(value, dict):
        return {k: _compact(v, limit) for k, v in value.items()}
    return value


def model_card_text(model: Any) -> str:
    """Human-readable model card of a :class:`resunet.inference.model.LoadedModel`."""
    meta = model.meta
    plan = meta.get("plan") or {}
    net = meta.get("network") or {}
    card = meta.get("model_card") or {}
    lines = [f"model      {model.name}"]
    lines.append(f"file       {model.path} ({model.kind})")
    lines.append(f"sha256     {model.sha256}")
    if meta.get("source_sha256") and model.kind != "torch":
        lines.append(f"exported from checkpoint sha256 {meta['source_sha256']}")
    preset = card.get("preset") or net.get("preset")
    widths = net.get("widths")
    lines.append(
        f"network    {preset or 'ResUNet'} {meta.get('spatial_dims', net.get('spatial_dims', '?'))}D, "
        f"block {net.get('block', '?')}, widths {widths}, norm {net.get('norm', '?')}, "
        f"size divisor {meta.get('size_divisor')}"
    )
    lines.append(f"channels   {', '.join(str(c) for c in meta.get('channels') or [])}")
    labels = meta.get("labels") or {}
    lines.append("labels     " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    sp = plan.get("spacing")
    lines.append(f"spacing    {' x '.join('native' if s is None else f'{float(s):g}' for s in sp) + ' mm' if sp else 'native'}")
    norms = plan.get("normalization")
    lines.append(f"normalise  {json.dumps(norms)}")
    lines.append(f"patch      {plan.get('patch_size')} voxels, modality {plan.get('modality', '?')}")
    lines.append(f"postproc   {json.dumps(meta.get('postprocess') or {})}")
    for key in ("intended_use", "training_data", "training", "metrics", "limitations", "license", "licence"):
        if key in card:
            value = card[key]
            text = value if isinstance(value, str) else json.dumps(_compact(value), indent=2)
            lines.append(f"{key.replace('_', ' '):<10} " + text.replace("\n", "\n           "))
    shown = {"name", "preset", "intended_use", "training_data", "training", "metrics", "limitations", "license", "licence"}
    for key, value in card.items():
        if key not in shown:
            text = value if isinstance(value, str) else json.dumps(_compact(value))
            lines.append(f"{key}: {text}")
    if meta.get("fingerprint"):
        lines.append(f"training data fingerprint {meta['fingerprint']}")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("trained with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def bundled_list_text() -> str:
    """One line per bundled model: name, labels (from its checkpoint) and file."""
    from resunet.inference.bundled import BUNDLED_MODELS, bundled_path
    from resunet.training.checkpoint import load_checkpoint

    lines = []
    for name, what in BUNDLED_MODELS.items():
        path = bundled_path(name)
        if path.is_file():
            labels = load_checkpoint(path).labels
            text = ", ".join(f"{k}={v}" for k, v in labels.items() if int(k) != 0)
            lines.append(f"{name:<18} labels {text}  ({path})")
        else:
            lines.append(f"{name:<18} {what}  (missing: {path})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from resunet.errors import ConfigError
    from resunet.inference.model import load_model

    if args.list:
        print(bundled_list_text())
        return 0
    if args.model is None:
        raise ConfigError("give a MODEL (file or bundled model name) or --list to list the bundled models")
    model = load_model(args.model)
    if args.json:
        print(json.dumps({"name": model.name, "kind": model.kind, "sha256": model.sha256, **model.meta}, indent=2))
    else:
        print(model_card_text(model))
    return 0
