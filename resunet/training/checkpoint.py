"""Self-describing model checkpoints that load without unpickling code.

Format (``"resunet-checkpoint/1"``, see ``docs/ARCHITECTURE.md``): one ``torch.save`` file holding a
dict made only of tensors, str, int, float, bool, None, list and dict, so
``torch.load(path, weights_only=True)`` reads it and never executes anything from the file.

- ``state_dict``: model weights, without the ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)
  prefixes, so the weights load into a bare :class:`resunet.nets.ResUNet`.
- ``network``: ``ResUNet.config``; ``ResUNet.from_config(network)`` rebuilds the module.
- ``plan``: :meth:`resunet.preprocess.PreprocessPlan.to_dict` (``spacing`` in mm along the
  reoriented RAS axes, ``normalization`` per channel) plus ``patch_size``, ``batch_size``,
  ``spatial_dims``, ``modality``, and whatever else the planner recorded.
- ``labels`` (``{"0": "background", "1": "brain"}``), ``channels`` (``["T1"]``), ``postprocess``,
  ``model_card``, ``fingerprint`` (sha256 of the training data listing), ``versions``.
- ``train_state`` (only in ``last.pt``): optimiser, scheduler, scaler and RNG states, epoch, etc.

The file's own SHA-256 (``Checkpoint.sha256``) is the model's identity in provenance records.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from resunet.errors import ModelError
from resunet.io.atomic import atomic_path
from resunet.io.hashing import sha256_file
from resunet.preprocess import PreprocessPlan

FORMAT = "resunet-checkpoint/1"

#: Prefixes that wrappers add to parameter names; stripped on save so weights load into a bare net.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

DEFAULT_POSTPROCESS: dict[str, Any] = {"largest_component": False, "fill_holes": False, "min_island_voxels": 0}


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape a model's numbers (resunet, torch, monai, numpy, python)."""
    import platform

    import numpy

    from resunet import __version__

    # str(): torch.__version__ is a TorchVersion (a str subclass weights_only loading refuses)
    versions = {"resunet": str(__version__), "torch": str(torch.__version__), "numpy": str(numpy.__version__),
                "python": platform.python_version()}
    try:
        import monai

        versions["monai"] = str(monai.__version__)
    except ImportError:  # monai is a dependency, but a checkpoint must still save without it
        versions["monai"] = "not installed"
    return versions


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the weights with DDP/torch.compile prefixes removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    stripped = True
        out[name] = value.detach().to("cpu").clone()
    return out


@dataclass
class Checkpoint:
    """A loaded checkpoint; fields as in the file (see module docstring), plus ``path`` and ``sha256``."""

    state_dict: dict[str, torch.Tensor]
    network: dict[str, Any]
    plan: dict[str, Any]
    labels: dict[str, str]
    channels: list[str]
    postprocess: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_POSTPROCESS))
    model_card: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    format: str = FORMAT
    path: Path | None = None
    sha256: str = ""

    @property
    def preprocess_plan(self) -> PreprocessPlan:
        """The :class:`PreprocessPlan` (target spacing, normalisation) to give :func:`resunet.preprocess.prepare`."""
        return PreprocessPlan.from_dict(self.plan)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return int(self.plan.get("spatial_dims", self.network.get("spatial_dims", 3)))

    @property
    def patch_size(self) -> list[int]:
        """Training patch size in voxels of the network grid (2 or 3 entries)."""
        return [int(p) for p in self.plan["patch_size"]]

    @property
    def num_classes(self) -> int:
        """Output channels of the network, background included."""
        return len(self.labels)

    def build_network(self) -> torch.nn.Module:
        """The ResUNet described by ``network``, with the weights loaded, in eval mode, on the CPU."""
        from resunet.nets import ResUNet

        try:
            net = ResUNet.from_config(dict(self.network))
            net.load_state_dict(self.state_dict)
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"checkpoint {self.path}: the weights do not fit the network it describes ({err})") from err
        return net.eval()


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, torch.Tensor],
    network: Mapping[str, Any],
    plan: Mapping[str, Any],
    labels: Mapping[str | int, str],
    channels: list[str],
    postprocess: Mapping[str, Any] | None = None,
    model_card: Mapping[str, Any] | None = None,
    fingerprint: str = "",
    versions: Mapping[str, str] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file + rename) and return its SHA-256.

    Args:
        path: destination ``.pt`` file; its folder is created.
        state_dict: model weights (``net.state_dict()``; DDP/compile prefixes are removed).
        network: ``ResUNet.config``.
        plan: ``PreprocessPlan.to_dict()`` plus ``patch_size``, ``batch_size``, ``spatial_dims``, ``modality``.
        labels: label value -> name, background included (keys stored as str).
        channels: input channel names in order.
        postprocess: post-processing defaults for inference.
        model_card: name, intended use, training data, metrics, limitations.
        fingerprint: sha256 of the training data listing.
        versions: software versions (default: :func:`software_versions`).
        train_state: resume state (only for ``last.pt``); tensors, numbers, str, lists and dicts only.

    Raises:
        ModelError: a field holds something ``weights_only`` loading could not read back.
    """
    payload: dict[str, Any] = {
        "format": FORMAT,
        "state_dict": clean_state_dict(state_dict),
        "network": _plain(dict(network), "network"),
        "plan": _plain(dict(plan), "plan"),
        "labels": {str(k): str(v) for k, v in labels.items()},
        "channels": [str(c) for c in channels],
        "postprocess": _plain(dict(postprocess if postprocess is not None else DEFAULT_POSTPROCESS), "postprocess"),
        "model_card": _plain(dict(model_card or {}), "model_card"),
        "fingerprint": str(fingerprint),
        "versions": {str(k): str(v) for k, v in (versions if versions is not None else software_versions()).items()},
        "train_state": _plain(dict(train_state), "train_state") if train_state is not None else None,
    }
    for key in ("patch_size", "spatial_dims"):
        if key not in payload["plan"]:
            raise ModelError(f"checkpoint plan needs '{key}' (got keys {sorted(payload['plan'])})")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared model from other users
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
    return sha256_file(path)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        ModelError: the file is missing, truncated/corrupt, not a torch file, or not a
            ``resunet-checkpoint/1`` (e.g. a bare state_dict or another tool's checkpoint).
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model checkpoint {p} does not exist; pass --model with a .pt file written by `resunet train`")
    if p.is_dir():
        raise ModelError(f"model checkpoint {p} is a folder; pass the .pt file (e.g. {p / 'best.pt'})")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(
            f"model checkpoint {p} holds objects other than tensors and plain data, or is corrupt; "
            f"refusing to unpickle it ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError) as err:
        raise ModelError(f"model checkpoint {p} is truncated or not a torch file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from err
    if not isinstance(data, dict) or "format" not in data:
        raise ModelError(f"{p} is not a resunet checkpoint (no 'format' tag; a bare state_dict or another tool's file?)")
    if data["format"] != FORMAT:
        raise ModelError(f"{p} has checkpoint format {data['format']!r}; this resunet reads {FORMAT!r}")
    missing = [k for k in ("state_dict", "network", "plan", "labels", "channels") if k not in data]
    if missing:
        raise ModelError(f"checkpoint {p} lacks {', '.join(missing)}; it is incomplete")
    return Checkpoint(
        state_dict=data["state_dict"],
        network=data["network"],
        plan=data["plan"],
        labels={str(k): str(v) for k, v in data["labels"].items()},
        channels=list(data["channels"]),
        postprocess=data.get("postprocess") or dict(DEFAULT_POSTPROCESS),
        model_card=data.get("model_card") or {},
        fingerprint=data.get("fingerprint", ""),
        versions=data.get("versions") or {},
        train_state=data.get("train_state"),
        format=data["format"],
        path=p,
        sha256=sha256_file(p),
    )


def _base_type(value: Any) -> type:
    """The builtin type a str/int/float subclass (TorchVersion, IntEnum, ...) is stored as."""
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t
    raise TypeError(type(value))


def _plain(value: Any, where: str) -> Any:
    """Convert tuples to lists and numpy scalars/arrays to Python/tensors; refuse anything else.

    Why by hand: ``weights_only`` loading accepts only a few types, and failing at save time with
    the offending key is clearer than a file that saves but will not load.
    """
    import numpy as np

    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, int, float, str)):
        return value if type(value) in (bool, int, float, str) else _base_type(value)(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ModelError(f"checkpoint field {where} holds a {type(value).__name__}, which weights_only loading cannot read")
