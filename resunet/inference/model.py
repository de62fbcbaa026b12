"""A trained model ready for inference, whatever file it came from.

Three kinds of model file hold the same network and the same metadata (plan, labels, channels,
post-processing, model card):

- a resunet checkpoint ``.pt`` (:func:`resunet.training.checkpoint.load_checkpoint`, loaded with
  ``weights_only=True``: no code from the file runs);
- an ONNX file written by ``resunet export --format onnx`` (metadata as JSON in the model's
  ``metadata_props`` under the key :data:`METADATA_KEY`), run with onnxruntime;
- a TorchScript file written by ``resunet export --format torchscript`` (metadata in the extra file
  :data:`EXTRA_FILE`).

:class:`LoadedModel` gives the :class:`~resunet.inference.predictor.Predictor` one call,
``forward(x) -> logits`` with ``x`` float32 ``(B, C, *spatial)``, plus the metadata.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from resunet.errors import ModelError
from resunet.io.hashing import sha256_file

#: key in ONNX ``metadata_props`` holding the JSON metadata
METADATA_KEY = "resunet"
#: name of the TorchScript extra file holding the JSON metadata
EXTRA_FILE = "resunet.json"
#: checkpoint fields that travel with an exported model
METADATA_FIELDS = ("network", "plan", "labels", "channels", "postprocess", "model_card", "fingerprint", "versions")


@dataclass
class LoadedModel:
    """A model plus everything needed to run it the way it was trained.

    Attributes:
        kind: ``"torch"`` (checkpoint), ``"onnx"`` or ``"torchscript"``.
        path: the model file (None for an in-memory checkpoint without a path).
        sha256: hex SHA-256 of the model file (for a checkpoint: its recorded hash).
        name: the model card's name, else the file name.
        meta: JSON-able dict with the :data:`METADATA_FIELDS` (plus ``source_sha256`` for exports).
        spatial_dims: 2 or 3.
        size_divisor: per spatial axis, window sizes must be multiples of it.
        module: the torch module (``kind`` torch/torchscript) or None.
        session: the onnxruntime session (``kind`` onnx) or None.
    """

    kind: str
    path: Path | None
    sha256: str
    name: str
    meta: dict[str, Any]
    spatial_dims: int
    size_divisor: tuple[int, ...]
    module: torch.nn.Module | None = None
    session: Any = None
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # -- metadata views ---------------------------------------------------------------------------
    @property
    def plan(self) -> dict[str, Any]:
        return dict(self.meta.get("plan") or {})

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, in output-channel order (channel ``c`` is the ``c``-th key)."""
        raw = self.meta.get("labels") or {}
        if isinstance(raw, list):
            return {i: str(n) for i, n in enumerate(raw)}
        return {int(k): str(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    @property
    def channels(self) -> list[str]:
        return [str(c) for c in (self.meta.get("channels") or ["image"])]

    @property
    def patch_size(self) -> tuple[int, ...] | None:
        ps = self.plan.get("patch_size")
        return tuple(int(p) for p in ps) if ps else None

    @property
    def has_dropout(self) -> bool:
        """True if the network has dropout layers with p > 0 (needed for Monte Carlo dropout)."""
        if self.module is None or self.kind != "torch":
            return False
        return any(float(getattr(m, "p", 0.0) or 0.0) > 0 and "Dropout" in type(m).__name__ for m in self.module.modules())

    # -- running ----------------------------------------------------------------------------------
    @property
    def channels_last(self) -> bool:
        """True when windows run in ``torch.channels_last_3d``: a 3D checkpoint on the CPU, where oneDNN's
        channels-last convolutions made the bundled model's forward 1.2-1.5x faster at 2-16 windows per
        call, the same masks to a voxel (bench/bench_memory_format.py, bench/results/predict.md section 6;
        training uses the same rule,
        ``resunet.training.loop._channels_last``). Not on CUDA (not measured there) nor 2D."""
        return self.kind == "torch" and self.module is not None and self.spatial_dims == 3 and self._device.type == "cpu"

    def to(self, device: torch.device) -> "LoadedModel":
        """Move the network to ``device`` (torch kinds) or pick onnxruntime's provider."""
        self._device = torch.device(device)
        if self.module is not None:
            self.module.to(device)
            if self.kind == "torch":
                fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
                self.module.to(memory_format=fmt)
        if self.session is not None and device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                self.session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
        return self

    def set_mc_dropout(self, on: bool) -> None:
        """Keep the network's dropout sampling in eval mode (Monte Carlo dropout) or not.

        Uses :meth:`resunet.nets.ResUNet.enable_mc_dropout`; norms stay in eval mode.
        """
        if self.module is None or self.kind != "torch":
            if on:
                raise ModelError(f"{self.name}: Monte Carlo dropout needs a checkpoint (.pt), not a {self.kind} export")
            return
        self.module.eval()
        if not on and not self.has_dropout:
            return
        if on and not self.has_dropout:
            raise ModelError(
                f"{self.name}: the network has no dropout layers, so Monte Carlo dropout cannot sample; "
                "use uncertainty='tta' instead"
            )
        self.module.enable_mc_dropout(bool(on))  # type: ignore[operator]

    def forward_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(x) -> logits``: ``x`` float32 ``(B, C, *spatial)`` on the model's device."""
        if self.session is not None:
            sess = self.session
            name = sess.get_inputs()[0].name
            fixed_batch = sess.get_inputs()[0].shape[0]
            fixed_batch = fixed_batch if isinstance(fixed_batch, int) else None

            def run_onnx(x: torch.Tensor) -> torch.Tensor:
                arr = x.detach().to("cpu", torch.float32).numpy()
                n = arr.shape[0]
                if fixed_batch is not None and n != fixed_batch:
                    # the export has a fixed batch size: run window by window
                    outs = [sess.run(None, {name: arr[i : i + 1]})[0] for i in range(n)]
                    out = np.concatenate(outs, axis=0)
                else:
                    out = sess.run(None, {name: np.ascontiguousarray(arr)})[0]
                return torch.from_numpy(out).to(x.device)

            return run_onnx
        assert self.module is not None
        module = self.module
        channels_last = self.channels_last

        def run_torch(x: torch.Tensor) -> torch.Tensor:
            out = module(x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x)
            if isinstance(out, (list, tuple)):  # deep supervision: full resolution first
                out = out[0]
            return out

        return run_torch


def load_model(model: Any) -> LoadedModel:
    """Load a model for inference from a path (``.pt`` checkpoint, ``.onnx``, TorchScript), the name of a
    bundled model (:mod:`resunet.inference.bundled`) or a Checkpoint.

    Raises:
        ModelError: the file is missing, unreadable, or lacks the resunet metadata.
    """
    if not isinstance(model, (str, os.PathLike)):
        return _from_checkpoint(model)
    from resunet.inference.bundled import BUNDLED_MODELS, resolve_model

    path = resolve_model(model)  # a bundled model's name ("brain_tissue") -> resunet/data/model/brain_tissue.pt
    if not path.exists():
        raise ModelError(f"{path}: no such model file; pass --model with a resunet checkpoint (.pt), an export "
                         f"(.onnx) or a bundled model name ({', '.join(BUNDLED_MODELS)})")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; pass the model file itself (.pt checkpoint or .onnx)")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if _is_torchscript(path):
        return _load_torchscript(path)
    from resunet.training.checkpoint import load_checkpoint

    return _from_checkpoint(load_checkpoint(path))


def checkpoint_metadata(ckpt: Any) -> dict[str, Any]:
    """The JSON-able metadata of a checkpoint that an export carries (plus ``source_sha256``)."""
    meta = {key: _jsonable(getattr(ckpt, key, None)) for key in METADATA_FIELDS}
    meta["source_sha256"] = getattr(ckpt, "sha256", None)
    meta["format"] = "resunet-export/1"
    return meta


def _from_checkpoint(ckpt: Any) -> LoadedModel:
    from resunet.nets import ResUNet

    try:
        net = ResUNet.from_config(dict(ckpt.network))
        net.load_state_dict(ckpt.state_dict, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        src = getattr(ckpt, "path", None) or "checkpoint"
        raise ModelError(f"{src}: weights do not fit the network config ({str(err).splitlines()[0][:200]})") from None
    net.eval()
    meta = checkpoint_metadata(ckpt)
    spatial_dims = int(meta.get("network", {}).get("spatial_dims") or meta.get("plan", {}).get("spatial_dims") or 3)
    meta["spatial_dims"] = spatial_dims
    meta["size_divisor"] = [int(d) for d in net.size_divisor]
    path = Path(ckpt.path) if getattr(ckpt, "path", None) else None
    sha = getattr(ckpt, "sha256", None) or (sha256_file(path) if path else "")
    return LoadedModel(
        kind="torch",
        path=path,
        sha256=sha,
        name=_model_name(meta, path),
        meta=meta,
        spatial_dims=spatial_dims,
        size_divisor=tuple(int(d) for d in net.size_divisor),
        module=net,
    )


def _load_onnx(path: Path) -> LoadedModel:
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others for a bad file
        raise ModelError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0][:160]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ModelError(
            f"{path}: ONNX model without resunet metadata; export it with `resunet export --format onnx`"
        )
    meta = json.loads(props[METADATA_KEY])
    del proto
    opts = ort.SessionOptions()
    threads = torch.get_num_threads()
    opts.intra_op_num_threads = max(1, threads)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{path}: onnxruntime cannot load the model ({str(err).splitlines()[0][:160]})") from None
    return _exported_model("onnx", path, meta, session=sess)


def _is_torchscript(path: Path) -> bool:
    if path.suffix.lower() in (".ts", ".torchscript", ".jit"):
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def _load_torchscript(path: Path) -> LoadedModel:
    extra = {EXTRA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"{path}: not a loadable TorchScript model ({str(err).splitlines()[0][:160]})") from None
    if not extra[EXTRA_FILE]:
        raise ModelError(f"{path}: TorchScript model without resunet metadata; export it with `resunet export`")
    raw = extra[EXTRA_FILE]
    meta = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    module.eval()
    return _exported_model("torchscript", path, meta, module=module)


def _exported_model(kind: str, path: Path, meta: dict[str, Any], **backend: Any) -> LoadedModel:
    """A LoadedModel for an exported file (ONNX/TorchScript) from the resunet metadata embedded in it."""
    return LoadedModel(
        kind=kind,
        path=path,
        sha256=sha256_file(path),
        name=_model_name(meta, path),
        meta=meta,
        spatial_dims=int(meta.get("spatial_dims") or meta.get("network", {}).get("spatial_dims", 3)),
        size_divisor=tuple(int(d) for d in meta.get("size_divisor") or ()),
        **backend,
    )


def _model_name(meta: dict[str, Any], path: Path | None) -> str:
    card = meta.get("model_card") or {}
    if isinstance(card, dict) and card.get("name"):
        return str(card["name"])
    return path.stem if path is not None else "model"


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so tuples, numpy scalars and tensors become plain JSON types."""
    def default(o: Any) -> Any:
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    return json.loads(json.dumps(value, default=default))
