"""The Predictor: one scan (Volume) in, a mask on exactly the scan's grid out.

Steps, each timed (``Prediction.timings``, seconds):

1. ``prepare``: :func:`resunet.preprocess.prepare` with the checkpoint's plan (reorient to the
   closest RAS axes, resample to the training spacing, normalise): the very function training used.
2. ``sliding_window``: MONAI's ``sliding_window_inference`` over the prepared grid with Gaussian
   blending, the configured overlap and ``sw_batch`` windows per network call. Every window is run
   through all mirror flips (test-time augmentation) and, for Monte Carlo dropout, several samples;
   the softmax probabilities of those passes are averaged before blending. ``network`` is the part
   of that time spent inside the network itself (what a bare network benchmark would measure).
   2D models run the same way on the slices of the reoriented axis their plan names (``slice_axis``,
   ``k`` by default).
3. ``restore``: :func:`resunet.preprocess.restore` maps each class's probability back onto the input
   grid (linear interpolation, then the inverse axis permutation/flip) and the argmax is taken there,
   one class at a time so only two full-size float arrays are alive at once.
4. ``postprocess``: largest component / islands / hole filling (:mod:`resunet.inference.postprocess`).

Uncertainty (``uncertainty="tta"`` or ``"mc"``): the normalised entropy of the mean softmax across
the passes, ``H = -sum_c p_c log p_c / log(C)`` (0 = all passes certain and agreeing, 1 = uniform).

Ensembles (``model`` a list of models, :mod:`resunet.inference.ensemble`): every member runs on
every window through the same flips (and MC samples), and the window's probability is the mean over
members and passes, ``p = mean_m mean_s p_{m,s}``; blending, restoring and post-processing then run
once. The uncertainty is the normalised entropy of that mean over members and passes (total
predictive uncertainty: it rises where the members disagree), and ``Prediction.disagreement`` is
the models' disagreement alone, the mutual information between the prediction and the member:
``(H(mean_m p_m) - mean_m H(p_m)) / log(C)``, with ``p_m`` member ``m``'s mean over its passes
(0 = the members agree, whatever their confidence), computed on each window and blended like the
probabilities (so overlapping windows that differ add nothing to it).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from resunet.errors import ConfigError, InputError, ModelError
from resunet.inference.ensemble import EnsembleModel
from resunet.inference.model import LoadedModel, load_model
from resunet.inference.postprocess import PostProcess
from resunet.io.volume import Volume
from resunet.io.limits import Limits
from resunet.preprocess import PreparedCase, PreprocessPlan, prepare, reorientation, restore, target_shape

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``: stage is ``"prepare"``, ``"windows"``, ``"restore"`` or ``"postprocess"``
ProgressFn = Callable[[str, int, int], None]

UNCERTAINTY_MODES = (None, "tta", "mc")
#: patch size used when a model's plan does not give one (voxels per axis)
DEFAULT_PATCH = {2: (256, 256), 3: (96, 96, 96)}


@dataclass
class Prediction:
    """The result of :meth:`Predictor.predict`.

    Attributes:
        mask: label map (uint8, or uint16 beyond 255 labels) on exactly the input's grid and affine;
            ``meta`` is the input's plus ``is_label=True`` and ``labels`` (value -> name).
        probabilities: label name -> float32 Volume of that label's probability on the input grid
            (foreground labels only), when requested; else None.
        uncertainty: float32 Volume of the normalised predictive entropy (0..1) on the input grid, or None.
        disagreement: ensembles with uncertainty on: float32 Volume of the members' normalised mutual
            information (0..1, see the module docstring); else None.
        warnings: what the reader of this result must know about its input (today: NaN/inf voxels that
            were set to 0 before segmenting; see :func:`screen_input`); they travel with the result into
            ``predictions.json``, the service's job JSON, the web page and the audit record.
        models: ``[{"name", "sha256", "path", "kind"}]`` of every model that made it (one, or an
            ensemble's members).
        volumes_ml: label name -> volume in mL (voxel count x voxel volume), foreground labels.
        voxel_counts: label name -> number of voxels, foreground labels.
        timings: stage -> seconds (``prepare``, ``sliding_window``, ``network``, ``restore``,
            ``postprocess``, ``total``).
        model_name, model_sha256: which model made it.
        device: where the network ran (``cpu``, ``cuda:0``).
        windows: number of network windows per pass; passes: flips x MC samples (x ensemble members) per window.
    """

    mask: Volume
    probabilities: dict[str, Volume] | None
    uncertainty: Volume | None
    volumes_ml: dict[str, float]
    voxel_counts: dict[str, int]
    timings: dict[str, float]
    model_name: str
    model_sha256: str
    device: str
    windows: int = 0
    passes: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    disagreement: Volume | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no arrays)."""
        return {
            "warnings": list(self.warnings),
            "volumes_ml": self.volumes_ml,
            "voxel_counts": self.voxel_counts,
            "timings": self.timings,
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "device": self.device,
            "windows": self.windows,
            "passes": self.passes,
            "settings": self.settings,
            "models": self.models,
        }


def screen_input(volumes: Sequence[Volume]) -> tuple[list[Volume], list[str]]:
    """Refuse input with nothing to segment; return the volumes to segment and the warnings they carry.

    A scan whose voxels are all NaN/inf (the NIfTI reader sets them to 0 and counts them in
    ``meta["nonfinite_voxels"]``) or all one value has no image in it: the network would still
    paint a normal-looking mask on it (an all-NaN head came out as 4.5 L of "brain"), so it is refused
    with the reason. NaN/inf voxels in part of a scan (outside a field of view) are set to 0 and the
    scan is segmented, with a warning that says how many, because the mask there means nothing.
    NaN/inf still in an array (a Volume built in memory) are set to 0 here in the same way (in a new
    Volume: the caller's is left as it is).
    """
    warnings: list[str] = []
    out: list[Volume] = []
    for c, v in enumerate(volumes):
        what = v.meta.get("source") or "the input"
        if len(volumes) > 1:
            what = f"{what} (channel {c})"
        arr = v.array
        n = int(arr.size)
        bad = int(v.meta.get("nonfinite_voxels") or 0)
        if np.issubdtype(arr.dtype, np.floating):
            in_array = ~np.isfinite(arr)
            extra = int(np.count_nonzero(in_array))
            if extra:
                bad += extra
                arr = np.where(in_array, 0, arr).astype(arr.dtype)
                v = v.with_array(arr, nonfinite_voxels=bad)
        if n and bad >= n:
            raise InputError(
                f"{what}: every voxel is NaN or infinite ({n} voxels), so there is no image to segment;"
                " check the file (a failed reconstruction or resampling writes such files) and export it again"
            )
        if n and arr.min() == arr.max():
            value = arr.flat[0]
            raise InputError(
                f"{what}: every voxel has the same value ({value:g}{', apart from NaN/inf' if bad else ''}), "
                "so there is no image to segment; check that the right series or file was chosen"
            )
        if bad:
            warnings.append(
                f"{what}: {bad} of {n} voxels ({100.0 * bad / n:.2g}%) were NaN or infinite and were set to 0"
                " before segmenting; the mask there carries no information"
            )
        out.append(v)
    return out, warnings


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if there is one, else the CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


class Predictor:
    """Segment scans with a trained model, mirroring training's preprocessing exactly.

    Args:
        model: a checkpoint path (``.pt``), an export (``.onnx``, TorchScript), a loaded
            ``resunet.training.checkpoint.Checkpoint`` or a :class:`LoadedModel`; or a list of them
            (an ensemble: probabilities averaged window by window, see the module docstring), or an
            :class:`~resunet.inference.ensemble.EnsembleModel`.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        tta: mirror test-time augmentation: average over all flips of the spatial axes
            (8 passes in 3D, 4 in 2D).
        overlap: fraction (0 <= overlap < 1) by which neighbouring windows overlap, per axis.
        sw_batch: windows per network call. On CPU keep it >= 2 (batch-1 small 3D convolutions hit
            PyTorch's slow fallback path).
        amp: float16 autocast for the network; default on for CUDA, ignored on CPU.
        postprocess: None = what the checkpoint says; a :class:`PostProcess`, a dict of its fields,
            or False for none.
        uncertainty: None, ``"tta"`` (entropy across flips; turns ``tta`` on) or ``"mc"`` (Monte Carlo
            dropout samples, also across flips if ``tta``).
        mc_samples: dropout samples per window and flip for ``uncertainty="mc"``.
        roi_size: window size in voxels per spatial axis; default the plan's patch size (rounded up to
            the network's size divisor and shrunk to the image where the image is smaller).
        stitch_on_cpu: None = decide by free GPU memory; True/False forces where windows are blended.
        max_batch: at most this many windows per network call when the TTA flips / MC samples of the
            ``sw_batch`` windows are batched together (never fewer than ``sw_batch``).
        limits: per-case limits (:mod:`resunet.io.limits`); the case's grid at the model's spacing is
            checked against them before it is made. Default :meth:`Limits.from_env`.
    """

    def __init__(
        self,
        model: Any,
        device: str | torch.device = "auto",
        tta: bool = True,
        overlap: float = 0.5,
        sw_batch: int = 2,
        amp: bool | None = None,
        postprocess: PostProcess | dict[str, Any] | bool | None = None,
        uncertainty: str | None = None,
        mc_samples: int = 4,
        roi_size: Sequence[int] | None = None,
        stitch_on_cpu: bool | None = None,
        max_batch: int = 8,
        limits: Limits | None = None,
    ) -> None:
        if not 0 <= float(overlap) < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch) < 1:
            raise ConfigError(f"sw_batch must be >= 1, got {sw_batch}")
        if uncertainty not in UNCERTAINTY_MODES:
            raise ConfigError(f"uncertainty must be one of None, 'tta', 'mc'; got {uncertainty!r}")
        if isinstance(model, (list, tuple)):
            model = model[0] if len(model) == 1 else EnsembleModel.load(model)
        self.model: LoadedModel | EnsembleModel = (
            model if isinstance(model, (LoadedModel, EnsembleModel)) else load_model(model))
        self.members: list[LoadedModel] = (
            list(self.model.members) if isinstance(self.model, EnsembleModel) else [self.model])
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.uncertainty = uncertainty
        self.tta = bool(tta) or uncertainty == "tta"
        self.overlap = float(overlap)
        self.sw_batch = int(sw_batch)
        self.amp = (self.device.type == "cuda") if amp is None else (bool(amp) and self.device.type == "cuda")
        self.mc_samples = max(1, int(mc_samples)) if uncertainty == "mc" else 1
        self.model.set_mc_dropout(uncertainty == "mc")
        if postprocess is None:
            self.postprocess = PostProcess.from_dict(self.model.meta.get("postprocess"))
        elif postprocess is False:
            self.postprocess = PostProcess()
        elif isinstance(postprocess, PostProcess):
            self.postprocess = postprocess
        else:
            self.postprocess = PostProcess.from_dict(postprocess)  # type: ignore[arg-type]
        self.plan = PreprocessPlan.from_dict(self.model.plan)
        self.spatial_dims = int(self.model.spatial_dims)
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"{self.model.name}: spatial_dims must be 2 or 3, got {self.spatial_dims}")
        patch = roi_size or self.model.patch_size or DEFAULT_PATCH[self.spatial_dims]
        patch = tuple(int(p) for p in patch)
        if self.spatial_dims == 2 and len(patch) == 3:
            patch = patch[:2]
        if len(patch) != self.spatial_dims:
            raise ConfigError(f"roi_size {patch} does not match a {self.spatial_dims}D model")
        self.patch = patch
        # 2D models: the reoriented axis the training sliced along (resunet.training.plan; k by default)
        slice_axis = self.model.plan.get("slice_axis")
        self.slice_axis = 2 if slice_axis is None else int(slice_axis)
        self.stitch_on_cpu = stitch_on_cpu
        self.max_batch = max(1, int(max_batch))
        self.labels = self.model.labels
        if not self.labels:
            raise ModelError(f"{self.model.name}: the model has no label names")
        self._forwards = [m.forward_fn() for m in self.members]
        # ensembles with uncertainty: the windows carry one more channel, the members' mutual information
        self._disagreement = len(self.members) > 1 and uncertainty is not None
        self.limits = limits

    # -- public -----------------------------------------------------------------------------------
    @property
    def flips(self) -> list[tuple[int, ...]]:
        """Flip combinations (tensor dims of a ``(B, C, *spatial)`` batch), identity first."""
        axes = list(range(2, 2 + self.spatial_dims))
        if not self.tta:
            return [()]
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def settings(self) -> dict[str, Any]:
        """The inference settings, for provenance records."""
        extra = {"ensemble": [m.sha256 for m in self.members]} if len(self.members) > 1 else {}
        return {
            "tta": self.tta,
            "flips": len(self.flips),
            "overlap": self.overlap,
            "sw_batch": self.sw_batch,
            "max_batch": self.max_batch,
            "amp": self.amp,
            "roi_size": list(self.patch),
            "uncertainty": self.uncertainty,
            "mc_samples": self.mc_samples if self.uncertainty == "mc" else None,
            "postprocess": self.postprocess.to_dict(),
            "blend": "gaussian",
            "backend": self.model.kind if len(self.members) == 1 else sorted({m.kind for m in self.members}),
            **extra,
        }

    def predict(
        self,
        volumes: Volume | Sequence[Volume],
        *,
        probabilities: bool = False,
        progress: ProgressFn | None = None,
        check_content: bool = True,
    ) -> Prediction:
        """Segment one case.

        Args:
            volumes: the scan, or one Volume per input channel (in the model's channel order) on one grid.
            probabilities: also return per-label probability Volumes on the input grid (float32;
                costs one input-sized float array per foreground label).
            progress: called as ``progress(stage, done, total)``.
            check_content: refuse blank input and warn about NaN/inf (:func:`screen_input`); only
                :meth:`warm_up`, which runs the network on zeros on purpose, turns it off.

        Raises:
            InputError: an all-NaN/inf or constant scan (nothing to segment), or wrong channel count.

        Returns:
            A :class:`Prediction` whose mask has exactly the input's shape and affine.
        """
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        if len(vols) != len(self.model.channels):
            raise InputError(
                f"model {self.model.name} expects {len(self.model.channels)} input channel(s) "
                f"({', '.join(self.model.channels)}), got {len(vols)}"
            )
        report = progress or (lambda stage, done, total: None)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        self._check_grid(vols[0])
        warnings: list[str] = []
        if check_content:
            vols, warnings = screen_input(vols)
        report("prepare", 0, 1)
        t = time.perf_counter()
        case = prepare(vols, self.plan)
        timings["prepare"] = time.perf_counter() - t
        report("prepare", 1, 1)

        t = time.perf_counter()
        net_time = [0.0]
        prob, n_windows = self._infer(case, report, net_time)  # (K, X, Y, Z) float32, CPU
        timings["sliding_window"] = time.perf_counter() - t
        timings["network"] = net_time[0]
        case.array = np.empty((0, 0, 0, 0), np.float32)  # the prepared input is no longer needed
        mutual_info = None
        if self._disagreement:  # last channel: the members' mutual information per window, blended
            mutual_info, prob = prob[-1], prob[:-1]

        unc_vol = dis_vol = None
        if self.uncertainty is not None:
            t = time.perf_counter()
            ent = _normalised_entropy(prob)
            unc = restore(ent[None], case)[0].astype(np.float32)
            unc_vol = vols[0].with_array(unc, is_label=False, description="normalised predictive entropy (0..1)")
            if mutual_info is not None:
                dis = restore(mutual_info[None], case)[0].astype(np.float32)
                dis_vol = vols[0].with_array(dis, is_label=False,
                                             description="ensemble disagreement: normalised mutual information (0..1)")
            timings["uncertainty"] = time.perf_counter() - t

        report("restore", 0, 1)
        t = time.perf_counter()
        label_values = list(self.labels)
        index, kept = _restore_argmax(prob, case, keep=range(1, prob.shape[0]) if probabilities else ())
        del prob
        lut = np.asarray(label_values, dtype=np.uint16 if max(label_values) > 255 else np.uint8)
        mask = index if np.array_equal(lut, np.arange(len(lut))) else lut[index]
        timings["restore"] = time.perf_counter() - t
        report("restore", 1, 1)

        report("postprocess", 0, 1)
        t = time.perf_counter()
        self.postprocess.apply(mask, [v for v in label_values if v != 0])
        timings["postprocess"] = time.perf_counter() - t
        report("postprocess", 1, 1)

        ref = vols[0]
        names = {v: n for v, n in self.labels.items()}
        extra = {}
        card_codes = (self.model.meta.get("model_card") or {}).get("label_codes")
        if card_codes:  # the model card's DICOM codes per label, for the SEG/SR writers
            extra["label_codes"] = card_codes
        card = self.model.meta.get("model_card") or {}
        if card.get("lesion_labels"):  # lesion classes: the SR reports each connected component (resunet.io.sr)
            from resunet.io.dicom_codes import lesion_labels_from_model_card  # pydicom only for such models

            extra["lesion_labels"] = list(lesion_labels_from_model_card(card, names.values()))
        mask_vol = ref.with_array(mask, is_label=True, labels={str(v): n for v, n in names.items()}, **extra)
        vox_ml = ref.voxel_volume_ml
        voxel_counts = {names[v]: int(np.count_nonzero(mask == v)) for v in label_values if v != 0}
        volumes_ml = {n: round(c * vox_ml, 6) for n, c in voxel_counts.items()}
        prob_vols = None
        if probabilities:
            prob_vols = {
                names[label_values[c]]: ref.with_array(arr, is_label=False, label=names[label_values[c]])
                for c, arr in kept.items()
            }
        timings["total"] = time.perf_counter() - t_start
        return Prediction(
            mask=mask_vol,
            probabilities=prob_vols,
            uncertainty=unc_vol,
            volumes_ml=volumes_ml,
            voxel_counts=voxel_counts,
            timings={k: round(v, 4) for k, v in timings.items()},
            model_name=self.model.name,
            model_sha256=self.model.sha256,
            device=str(self.device),
            windows=n_windows,
            passes=len(self.flips) * self.mc_samples * len(self.members),
            settings=self.settings(),
            disagreement=dis_vol,
            models=self.model_records(),
            warnings=warnings,
        )

    def model_records(self) -> list[dict[str, Any]]:
        """``[{"name", "sha256", "path", "kind"}]`` per model (one, or each ensemble member)."""
        return [{"name": m.name, "sha256": m.sha256, "path": str(m.path) if m.path is not None else None,
                 "kind": m.kind} for m in self.members]

    def warm_up(self) -> None:
        """One prediction on a blank volume of one window at the model's spacing.

        PyTorch's first convolutions on CPU cost seconds of one-off setup; ``resunet serve`` and the
        web UI pay them when the model loads, not on the first case. The zeros are on purpose (the
        blank-input check is off for this call).
        """
        spacing = [s or 1.0 for s in (self.plan.spacing or (1.0, 1.0, 1.0))]
        patch = list(self.patch) + [1] * (3 - len(self.patch))
        blank = Volume(np.zeros(patch, np.float32), np.diag([*spacing, 1.0]), meta={"source": "warm-up"})
        self.predict([blank] * len(self.model.channels), check_content=False)

    # -- internals --------------------------------------------------------------------------------
    def _check_grid(self, volume: Volume) -> None:
        """Refuse, before any allocation, a case whose grid at the model's spacing is too large for the
        limits or too small for the network (one line naming the sizes, spacings and accepted range)."""
        limits = self.limits if self.limits is not None else Limits.from_env()
        source = volume.meta.get("source", "the scan")
        spacing = volume.spacing
        limits.check_spacing(source, spacing)
        _, ro_shape, ro_affine = reorientation(volume.affine, volume.shape)
        grid = target_shape(ro_shape, np.linalg.norm(ro_affine[:3, :3], axis=0), self.plan.spacing)
        limits.check_model_grid(source, volume.shape, spacing, grid, self.plan.spacing,
                                channels=len(self.model.channels), classes=len(self.labels))
        if self.spatial_dims == 3:
            planes = [grid]
        else:  # 2D models see the slices of their slice axis
            planes = [[g for a, g in enumerate(grid) if a != self.slice_axis]]
        div = self.model.size_divisor or (1,) * len(planes[0])
        div = tuple(div) * len(planes[0]) if len(div) == 1 else tuple(div)
        if not any(int(g) > int(d) for g, d in zip(planes[0], div)):
            need = " or ".join(f"{int(d) + 1}" for d in sorted(set(div)))
            target = " x ".join("native" if s is None else f"{float(s):.4g}" for s in (self.plan.spacing or ()))
            raise InputError(
                f"{source}: the scan ({'x'.join(str(s) for s in volume.shape)} voxels of"
                f" {' x '.join(f'{s:.4g}' for s in spacing)} mm) is {'x'.join(str(int(g)) for g in grid)} voxels at"
                f" the model's voxel size ({target or 'native'} mm); the network needs more than {need} voxels along"
                " at least one axis there: check that this is the whole scan and its voxel size is right"
            )

    def roi_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Window size for an image of ``shape`` (spatial): the patch size, shrunk to the image where
        the image is smaller, rounded up to the network's size divisor on every axis."""
        div = self.model.size_divisor or (1,) * len(shape)
        if len(div) == 1:
            div = div * len(shape)
        roi = []
        for p, s, d in zip(self.patch, shape, div):
            r = min(int(p), int(s))
            roi.append(int(math.ceil(r / d) * d))
        return tuple(roi)

    def _window_fn(self, net_time: list[float], counter: Callable[[int], None]) -> Callable[[torch.Tensor], torch.Tensor]:
        forwards = self._forwards
        with_entropy = self._disagreement
        flips = self.flips
        samples = self.mc_samples
        amp = self.amp
        dev = self.device
        sync = dev.type == "cuda"

        passes = [dims for dims in flips for _ in range(samples)]
        cap = self.max_batch

        def window(x: torch.Tensor) -> torch.Tensor:
            # All TTA/MC passes of the sw_batch windows go through the network together, in calls of
            # at most max(max_batch, B) windows: on CPU one call of 8 windows of 64^3 cost ~0.4x per
            # window of a call of 2 (measured, bundled model). Ensemble members run one after the
            # other on the same (flipped) windows; the flipped inputs are rebuilt per member, which
            # costs far less than a network call.
            b = int(x.shape[0])
            per_call = max(1, max(cap, b) // b)
            acc: torch.Tensor | None = None
            entropy: torch.Tensor | None = None  # sum over members of H(p_m), nats
            for forward in forwards:
                member: torch.Tensor | None = None
                for g in range(0, len(passes), per_call):
                    group = passes[g : g + per_call]
                    xin = torch.cat([torch.flip(x, d) if d else x for d in group]) if len(group) > 1 else (
                        torch.flip(x, group[0]) if group[0] else x)
                    t0 = time.perf_counter()
                    if amp:
                        with torch.autocast(device_type="cuda", dtype=torch.float16):
                            logits = forward(xin)
                    else:
                        logits = forward(xin)
                    if sync:
                        torch.cuda.synchronize(dev)
                    net_time[0] += time.perf_counter() - t0
                    probs = torch.softmax(logits.float(), dim=1)
                    for i, d in enumerate(group):
                        p = probs[i * b : (i + 1) * b]
                        if d:
                            p = torch.flip(p, d)
                        member = p.clone() if member is None else member.add_(p)
                assert member is not None
                if with_entropy:  # this member's entropy of its mean over the passes, (B, 1, ...) nats
                    pm = member / len(passes)
                    h = -torch.xlogy(pm, pm).sum(dim=1, keepdim=True)
                    entropy = h if entropy is None else entropy.add_(h)
                acc = member if acc is None else acc.add_(member)
            assert acc is not None
            counter(b)
            acc.div_(len(passes) * len(forwards))
            if entropy is not None:  # mutual information, normalised: H(mean) - mean H, / log C
                total = -torch.xlogy(acc, acc).sum(dim=1, keepdim=True)
                mi = (total - entropy.div_(len(forwards))).div_(math.log(max(acc.shape[1], 2))).clamp_(0.0, 1.0)
                return torch.cat([acc, mi], dim=1)
            return acc

        return window

    def _stitch_device(self, n_classes: int, spatial: Sequence[int]) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        if self.stitch_on_cpu is not None:
            return torch.device("cpu") if self.stitch_on_cpu else self.device
        need = (n_classes + 2) * int(np.prod(spatial)) * 4  # output + count map + input, float32
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < 0.5 * free else torch.device("cpu")

    def _infer(self, case: PreparedCase, report: ProgressFn, net_time: list[float]) -> tuple[torch.Tensor, int]:
        """Sliding-window probabilities on the prepared grid: float32 ``(K, X, Y, Z)`` on the CPU (plus the
        members' blended mutual information as channel ``K`` for ensembles with uncertainty)."""
        n_classes = len(self.labels)
        n_out = n_classes + (1 if self._disagreement else 0)
        x = torch.from_numpy(case.array)
        if self.spatial_dims == 2:
            x = x.movedim(1 + self.slice_axis, -1)  # the sliced axis last
        spatial = tuple(x.shape[1:])
        if self.spatial_dims == 3:
            roi = self.roi_for(spatial)
            per_image = _count_windows(spatial, roi, self.overlap)
            total = per_image
            batches = [(None, x[None])]
        else:
            roi = self.roi_for(spatial[:2])
            per_image = _count_windows(spatial[:2], roi, self.overlap)
            # slices of the k axis become the batch: (Z, C, X, Y), in chunks to bound memory
            chunk = max(self.sw_batch, 16)
            total = per_image * spatial[2]
            batches = [
                ((z0, min(z0 + chunk, spatial[2])), x[..., z0 : min(z0 + chunk, spatial[2])].permute(3, 0, 1, 2))
                for z0 in range(0, spatial[2], chunk)
            ]
        done = [0]

        def count(n: int) -> None:
            done[0] += n
            report("windows", min(done[0], total), total)

        # MONAI is imported here, not at the top: `resunet predict` reads its first case before paying
        # for MONAI's import (about half the command's imports; issue 23 point 3)
        from monai.inferers import sliding_window_inference

        window = self._window_fn(net_time, count)
        stitch = self._stitch_device(n_out, spatial)
        report("windows", 0, total)
        out: torch.Tensor | None = None
        for zrange, inp in batches:
            with torch.inference_mode():
                res = sliding_window_inference(
                    inp.contiguous(),
                    roi_size=roi,
                    sw_batch_size=self.sw_batch,
                    predictor=window,
                    overlap=self.overlap,
                    mode="gaussian",
                    sw_device=self.device,
                    device=stitch,
                )
            assert isinstance(res, torch.Tensor)
            res = res.to("cpu", torch.float32)
            if zrange is None:
                out = res[0]
            else:
                if out is None:
                    out = torch.empty((n_out, *spatial), dtype=torch.float32)
                out[..., zrange[0] : zrange[1]] = res.permute(1, 2, 3, 0)
        assert out is not None
        if self.spatial_dims == 2:
            out = out.movedim(-1, 1 + self.slice_axis)
        if out.shape[0] != n_out:
            raise ModelError(
                f"{self.model.name}: the network gives {out.shape[0] - n_out + n_classes} output channels but the "
                f"model declares {n_classes} labels"
            )
        return out, total


def _count_windows(image: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows per image, as MONAI's sliding_window_inference places them."""
    from monai.data.utils import dense_patch_slices

    size = tuple(max(int(s), int(r)) for s, r in zip(image, roi))
    interval = tuple(int(r) if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi))
    return len(dense_patch_slices(size, tuple(roi), interval))


def _normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """``-sum_c p log p / log C`` over the class axis of ``(C, ...)``: 0 certain, 1 uniform."""
    c = prob.shape[0]
    ent = torch.zeros(prob.shape[1:], dtype=torch.float32)
    for k in range(c):
        p = prob[k]
        ent -= torch.xlogy(p, p)
    return ent / math.log(max(c, 2))


def _restore_argmax(
    prob: torch.Tensor, case: PreparedCase, keep: Sequence[int] | range = ()
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Argmax over classes of the probabilities restored onto the input grid, one class at a time.

    Returns the class index map (uint8/uint16 ``(I, J, K)``) and the restored probabilities of the
    classes in ``keep``. Ties go to the lower class index, as ``np.argmax``. With two classes only
    the foreground is restored and thresholded (``p1 > 0.5``, i.e. ``p1 > p0`` since restoring is
    linear and ``p0 + p1 = 1``), so a single input-sized float array is alive at any time.
    """
    n = prob.shape[0]
    kept: dict[int, np.ndarray] = {}
    keep = set(keep)
    if n == 2:
        p1 = restore(prob[1:2], case)[0]
        index = (p1 > 0.5).view(np.uint8)
        if 1 in keep:
            kept[1] = p1
        return index, kept
    best: np.ndarray | None = None
    index = np.zeros(case.input_shape, dtype=np.uint8 if n <= 256 else np.uint16, order="F")
    for c in range(n):
        ch = restore(prob[c : c + 1], case)[0]
        if c in keep:
            kept[c] = np.array(ch, dtype=np.float32, copy=True)
        if best is None:
            best = ch
            continue
        better = ch > best
        index[better] = c
        np.maximum(best, ch, out=best)
        del better, ch
    return index, kept
