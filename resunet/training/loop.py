"""The training loop: from a dataset folder and a :class:`TrainConfig` to ``best.pt`` / ``last.pt``.

One function, :func:`train`, runs single-process or under ``torchrun`` (DistributedDataParallel:
NCCL on CUDA, gloo on CPU; every rank draws its own shard of patches through a
``DistributedSampler``; rank 0 alone validates, logs and writes files). It runs in phases, each
callable (and tested) alone: :func:`set_up` (process, cases, plan, network, optimiser, resume, data:
a :class:`TrainingRun`), per epoch :func:`train_one_epoch` then :func:`end_of_epoch` (validation,
schedule, log row, ``best.pt``/``last.pt``), and :func:`finish` (held-out predictions with the
:class:`resunet.inference.Predictor`).

Reproducibility and resume. At the start of epoch ``e`` every random source is re-seeded from
``(seed, e, rank)``: torch, numpy, Python ``random``, the MONAI transforms and the sampler. The state
at an epoch boundary is therefore model + optimiser + scheduler + scaler + epoch, which ``last.pt``
stores after every epoch (with the RNG states too). A run killed at any moment and resumed with
``--resume`` continues from its last completed epoch and, with ``deterministic: true`` and the same
``num_workers``, ends with bit-identical weights to a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from resunet.errors import ConfigError, DatasetError
from resunet.inference import Predictor  # held-out predictions: training may use inference (docs/ARCHITECTURE.md)
from resunet.io.atomic import atomic_write_text
from resunet.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, software_versions
from resunet.training.config import TrainConfig
from resunet.training.dataset import DatasetSpec, load_dataset
from resunet.training.plan import TrainingPlan, collect_stats, make_plan
from resunet.training.transforms import PrepareCase, crop_size, train_transforms

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports (rank 0; other ranks get the same numbers where shared)."""

    out: Path
    epochs: int
    best_dice: float | None
    best_epoch: int | None
    last_dice: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- set-up
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- split
def split_cases(case_ids: list[str], folds: int, fold: int, seed: int, val_cases: list[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids: k-fold by case with a fixed shuffle seed (``folds=1``: no validation)."""
    ids = sorted(case_ids)
    if val_cases:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise ConfigError(f"dataset.val_cases names unknown case(s) {unknown}")
        return [c for c in ids if c not in val_cases], [c for c in ids if c in val_cases]
    if folds <= 1:
        return ids, []
    if len(ids) < folds:
        raise DatasetError(f"{len(ids)} cases cannot be split into {folds} folds; set dataset.folds to at most {len(ids)} "
                           "(or 1 to train on all cases without validation)")
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[fold::folds])
    return [c for c in ids if c not in val], val


def effective_folds(n_cases: int, folds: int) -> tuple[int, str | None]:
    """The number of folds a dataset of ``n_cases`` allows, and the line saying why when it is fewer.

    Fewer cases than folds: as many folds as cases (each fold holds out one case); one case: a
    single fold that trains on it without validation. Otherwise ``folds`` unchanged and no line.
    """
    if folds <= 1 or n_cases >= folds:
        return folds, None
    if n_cases >= 2:
        return n_cases, (f"{n_cases} cases cannot be split into {folds} folds: using {n_cases} folds instead (one "
                         f"case held out for validation per fold); dataset.folds={n_cases} is recorded in config.yaml")
    return 1, (f"{n_cases} case cannot be split into {folds} folds: training on it without validation; "
               "dataset.folds=1 is recorded in config.yaml")


# ------------------------------------------------------------------------------------- builders
def build_network(cfg: TrainConfig, plan: TrainingPlan, in_channels: int, out_channels: int) -> torch.nn.Module:
    from resunet.nets import ResUNet
    from resunet.nets.presets import merged_kwargs

    # The user's overrides first, then the planner's strides on top: the planner already planned
    # from the preset merged with the overrides (to fix strides, set plan.strides).
    kwargs = merged_kwargs(cfg.model.overrides, plan.network)
    kwargs["deep_supervision"] = cfg.model.deep_supervision
    _fit_decoder_widths(cfg.model.preset, plan.spatial_dims, in_channels, out_channels, kwargs)
    return ResUNet.from_preset(cfg.model.preset, spatial_dims=plan.spatial_dims, in_channels=in_channels,
                               out_channels=out_channels, **kwargs)


def _fit_decoder_widths(preset: str, spatial_dims: int, in_channels: int, out_channels: int,
                        kwargs: dict[str, Any]) -> None:
    """Trim explicit decoder widths (finest first) when the planned strides give fewer decoder levels.

    The planner may switch off a preset's deepest downsampling for a small patch; the preset's (or
    the user's) per-level decoder widths then list one level too many. The finest levels are kept.
    """
    from resunet.nets.config import ResUNetConfig
    from resunet.nets.presets import merged_kwargs, preset_kwargs

    merged = merged_kwargs(preset_kwargs(preset), kwargs)
    widths = (merged.get("decoder") or {}).get("widths")
    if not isinstance(widths, (list, tuple)):
        return
    probe = dict(merged)
    probe["decoder"] = {**merged["decoder"], "widths": None}
    probe.pop("deep_supervision", None)
    n_levels = ResUNetConfig.build(spatial_dims, in_channels, out_channels, **probe).num_decoder_levels
    if len(widths) > n_levels:
        kwargs["decoder"] = {**(kwargs.get("decoder") or {}), "widths": list(widths)[:n_levels]}


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Per-epoch schedule (torch.optim.lr_scheduler); warm-up is a LinearLR before poly/cosine/step."""
    o = cfg.optim
    sched = torch.optim.lr_scheduler
    warm = min(o.warmup_epochs, max(cfg.epochs - 1, 0))
    main_epochs = max(cfg.epochs - warm, 1)
    if o.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="max", factor=o.plateau_factor, patience=o.plateau_patience)
    if o.scheduler == "none":
        main: Any = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif o.scheduler == "poly":
        main = sched.PolynomialLR(optimizer, total_iters=main_epochs, power=o.poly_exponent)
    elif o.scheduler == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=o.min_lr)
    else:
        main = sched.StepLR(optimizer, step_size=o.step_size, gamma=o.step_gamma)
    if warm > 0 and o.scheduler != "none":
        first = sched.LinearLR(optimizer, start_factor=1e-2, end_factor=1.0, total_iters=warm)
        return sched.SequentialLR(optimizer, [first, main], milestones=[warm])
    return main


def _advanced_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, epochs_done: int) -> Any:
    """A fresh schedule for ``cfg.epochs`` stepped ``epochs_done`` times, from the base learning rates."""
    import warnings

    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = build_scheduler(cfg, optimizer)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs_done):
            scheduler.step()
    return scheduler


def build_loss(cfg: TrainConfig, deep_supervision: bool) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=cfg.loss.include_background,
                      batch=cfg.loss.batch_dice, lambda_dice=cfg.loss.lambda_dice, lambda_ce=cfg.loss.lambda_ce)
    if not deep_supervision:
        return base
    w = cfg.loss.ds_weights
    return DeepSupervisionLoss(base, weight_mode="exp", weights=list(w) if isinstance(w, (list, tuple)) else None)


def _amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "none":
        return None
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ------------------------------------------------------------------------------------ data
def _datasets(cfg: TrainConfig, spec: DatasetSpec, plan: TrainingPlan, train_ids: list[str], val_ids: list[str],
              out: Path, rehearsal: DatasetSpec | None = None, masked: DatasetSpec | None = None) -> tuple[Any, Any]:
    """The training and validation datasets; with ``rehearsal`` or ``masked`` the training one is a
    :class:`_Mixed` of the training cases (indices first), their masked copies (``finetune.masked_copies``,
    indices next: drawn as training cases) and the rehearsal cases (indices last); with ``masked`` the
    validation set holds the held-out cases' masked copies after the held-out cases."""
    train_ds, val_ds = _case_datasets(cfg, spec, plan, train_ids, val_ids, out)
    if rehearsal is None and masked is None:
        return train_ds, val_ds
    parts = [train_ds]
    if masked is not None:  # the training corrections' copies are trained on, the held-out ones' validated on
        masked_train, masked_val = _case_datasets(cfg, masked, plan, [f"{c}_masked" for c in train_ids],
                                                  [f"{c}_masked" for c in val_ids], out / "masked_cache")
        parts.append(masked_train)
        if val_ds is not None and masked_val is not None:
            val_ds = torch.utils.data.ConcatDataset([val_ds, masked_val])
    if rehearsal is not None:
        parts.append(_case_datasets(cfg, rehearsal, plan, [c.case_id for c in rehearsal.cases], [],
                                    out / "rehearsal_cache")[0])
    mark = rehearsal is not None and cfg.finetune.distill_weight > 0
    return _Mixed(parts, mark_last=mark), val_ds


class _Mixed(torch.utils.data.ConcatDataset):
    """Training cases, their masked copies, then rehearsal cases (each with its own reader); one seed call
    reaches all. With ``mark_last`` every sample says whether it is a rehearsal draw (the last dataset),
    as ``sample["rehearsal"]`` (``finetune.distill_weight``)."""

    def __init__(self, datasets: list[Any], mark_last: bool = False) -> None:
        super().__init__(datasets)
        self.mark_last = mark_last

    def __getitem__(self, idx: int) -> Any:
        item = super().__getitem__(idx)
        if self.mark_last:
            flag = torch.tensor(idx >= self.cumulative_sizes[-2] if len(self.datasets) > 1 else False)
            for sample in item if isinstance(item, list) else [item]:
                sample["rehearsal"] = flag
        return item

    def set_random_state(self, seed: int) -> None:
        for k, ds in enumerate(self.datasets):
            ds.transform.set_random_state(seed=(seed + k) % (2**31 - 1))


def _seed_transforms(train_ds: Any, seed: int) -> None:
    if isinstance(train_ds, _Mixed):
        train_ds.set_random_state(seed)
    else:
        train_ds.transform.set_random_state(seed=seed)


def _case_datasets(cfg: TrainConfig, spec: DatasetSpec, plan: TrainingPlan, train_ids: list[str], val_ids: list[str],
                   out: Path) -> tuple[Any, Any]:
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose

    patch3 = crop_size(plan.patch_size, plan.spatial_dims)
    prep = PrepareCase(spec, plan.preprocess_plan(), plan.slice_axis, patch3)
    items = {c.case_id: c.to_dict() for c in spec.cases}
    train_items = [items[c] for c in train_ids]
    val_items = [items[c] for c in val_ids]
    train_tf = Compose([prep, *train_transforms(plan.patch_size, plan.spatial_dims, cfg.augment)])
    val_tf = Compose([prep])
    if cfg.dataset.cache == "memory":
        kw = {"num_workers": max(cfg.dataset.num_workers, 1), "progress": False, "copy_cache": False}
        return CacheDataset(train_items, train_tf, **kw), CacheDataset(val_items, val_tf, **kw) if val_items else None
    if cfg.dataset.cache == "disk":
        cache_dir = Path(cfg.dataset.cache_dir or out / "cache")
        return (PersistentDataset(train_items, train_tf, cache_dir=cache_dir),
                PersistentDataset(val_items, val_tf, cache_dir=cache_dir) if val_items else None)
    return Dataset(train_items, train_tf), Dataset(val_items, val_tf) if val_items else None


class _EpochSampler(torch.utils.data.Sampler):
    """``n`` case draws per epoch, sharded across ranks by ``DistributedSampler`` (seeded by epoch).

    Why a wrapper: an epoch here is a fixed number of steps (nnU-Net style), not one pass over the
    cases, so the case list is repeated to length ``n * world`` before the DistributedSampler
    shuffles it and hands each rank its share.
    """

    def __init__(self, n_cases: int, per_rank: int, d: _Dist, seed: int, n_rehearse: int = 0,
                 rehearse_fraction: float = 0.0, n_masked: int = 0, masked_fraction: float = 0.0) -> None:
        from resunet.training.rehearsal import mixed_draws

        self.n_cases, self.per_rank, self.d, self.seed = n_cases, per_rank, d, seed
        self._mix = (n_cases, n_rehearse, rehearse_fraction, per_rank * d.world)
        self._masked = {"n_masked": n_masked, "masked_fraction": masked_fraction}
        # rehearsal (fine-tuning): a share of the draws are the rehearsal cases, indices after the n_cases
        self._index = mixed_draws(*self._mix, **self._masked)
        self.inner = torch.utils.data.DistributedSampler(self._index, num_replicas=d.world, rank=d.rank,
                                                         shuffle=True, seed=seed, drop_last=True)

    def set_epoch(self, epoch: int) -> None:
        from resunet.training.rehearsal import mixed_draws

        # the case cycle goes on across epochs: with fewer draws per epoch than cases, every case comes up
        self._index[:] = mixed_draws(*self._mix, epoch=epoch, **self._masked)
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (self._index[i] for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def _channels_last(cfg: TrainConfig, device: torch.device, spatial_dims: int) -> bool:
    """Channels-last on CUDA, and on the CPU for 3D only: there it made training steps 1.1-1.3x faster
    (oneDNN), while 2D steps got slower (bench/results/nets.md)."""
    return cfg.channels_last and (device.type == "cuda" or spatial_dims == 3)


# ------------------------------------------------------------------------------------ validation
def _predictor(net: torch.nn.Module, spatial_dims: int, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if spatial_dims == 3:
        if channels_last:
            return lambda x: net(x.contiguous(memory_format=torch.channels_last_3d))
        return net
    # 2D: windows are (B, C, px, py, 1) slabs of the volume (slice axis last)
    return lambda x: net(x[..., 0]).unsqueeze(-1)


@torch.no_grad()
def validate(net: torch.nn.Module, dataset: Any, plan: TrainingPlan, cfg: TrainConfig, device: torch.device,
             n_labels: int, amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Whole-volume sliding-window inference on the held-out cases; Dice per label on the network grid.

    Returns ``{"dice_mean": ..., "dice_<label>": ...}`` (labels 1..n-1; NaN-free means over the cases
    where the label is present in the reference or the prediction).
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_dice

    net.eval()
    roi = crop_size(plan.patch_size, plan.spatial_dims)
    predictor = _predictor(net, plan.spatial_dims, _channels_last(cfg, device, plan.spatial_dims))
    per_label: list[list[float]] = [[] for _ in range(n_labels - 1)]
    n = len(dataset) if cfg.validation.max_cases is None else min(len(dataset), cfg.validation.max_cases)
    for i in range(n):
        item = dataset[i]
        image = torch.as_tensor(item["image"])[None].to(device)
        label = torch.as_tensor(np.asarray(item["label"]))[None].to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = sliding_window_inference(image, roi, cfg.validation.sw_batch_size, predictor,
                                              overlap=cfg.validation.overlap, mode=cfg.validation.mode)
        pred = torch.as_tensor(logits).float().argmax(1, keepdim=True)
        p1 = F.one_hot(pred[:, 0].long(), n_labels).movedim(-1, 1)
        r1 = F.one_hot(label[:, 0].long(), n_labels).movedim(-1, 1)
        dice = compute_dice(p1, r1, include_background=False, ignore_empty=True)[0]
        for k in range(n_labels - 1):
            v = float(dice[k])
            if math.isnan(v):
                v = 1.0 if not bool(p1[:, k + 1].any()) else 0.0  # label absent in the reference
            per_label[k].append(v)
    out = {f"dice_{k + 1}": float(np.mean(v)) for k, v in enumerate(per_label)}
    out["dice_mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


# ------------------------------------------------------------------------------------ logging
class _Logger:
    """log.csv (rewritten atomically each epoch) and TensorBoard when installed; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_epoch: int) -> None:
        self.path = out / "log.csv"
        self.rows: list[dict[str, Any]] = []
        self.enabled = enabled
        if enabled and self.path.exists():
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= start_epoch]
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard not installed: log.csv is the record
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, int(row["epoch"]))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _gpu_util(device: torch.device) -> float | str:
    if device.type != "cuda":
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    except Exception:  # NVML missing or not permitted: the column stays empty
        return ""


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled, transient=False)


def _rank_weight_hashes(net: torch.nn.Module, d: _Dist) -> list[str]:
    """SHA-256 of every rank's weights (gathered on all ranks); raises if DDP replicas diverged."""
    import hashlib

    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    mine = h.hexdigest()
    if not d.enabled:
        return [mine]
    hashes: list[Any] = [None] * d.world
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) != 1:
        raise RuntimeError(f"DDP replicas diverged: weight hashes per rank {hashes}")
    return [str(x) for x in hashes]


# ------------------------------------------------------------------------------------ main entry
def train(cfg: TrainConfig, *, resume: bool = False, plan: TrainingPlan | None = None) -> TrainResult:
    """Train as ``cfg`` says; writes ``config.yaml``, ``plan.json``, ``log.csv``, ``last.pt``, ``best.pt`` to ``cfg.out``.

    Args:
        cfg: the resolved configuration (``cfg.data``, ``cfg.out`` must be set).
        resume: continue from ``cfg.out/last.pt`` (model, optimiser, scheduler, scaler, RNG, epoch).
        plan: use this plan instead of planning from the training cases (:func:`train_folds` plans
            once on all cases so that every fold shares it and the folds can form an ensemble).

    Raises:
        DatasetError, ConfigError, ModelError: bad dataset, configuration or resume checkpoint.

    Process-wide torch settings changed for the run (threads, deterministic algorithms, MONAI
    meta tracking) are put back afterwards, so a library caller's process is left as it was.
    """
    from monai.data import get_track_meta, set_track_meta

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), get_track_meta(),
             torch.backends.cudnn.benchmark)
    try:
        return _train(cfg, resume, plan)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        set_track_meta(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _train(cfg: TrainConfig, resume: bool, given_plan: TrainingPlan | None = None) -> TrainResult:
    """The run over its phases: set-up, then per epoch the training pass and the end of the epoch."""
    run = set_up(cfg, resume, given_plan)
    validate_parent(run)
    with _progress(run.cfg.progress and run.dist.main) as progress:
        for epoch in range(run.start_epoch, run.cfg.epochs):
            stats = train_one_epoch(run, epoch, progress)
            end_of_epoch(run, epoch, stats, progress)
    return finish(run)


@dataclass
class TrainingRun:
    """Everything a run holds between its phases (:func:`set_up` makes it; the epoch phases advance it).

    ``net`` is the plain network (what checkpoints store); ``model`` the one trained (compiled and/or
    wrapped in DistributedDataParallel). ``start_epoch``, ``best_dice``/``best_epoch``, ``last_val``,
    ``history`` and ``rank_hashes`` change as epochs end.
    """

    cfg: TrainConfig
    out: Path
    dist: _Dist
    device: torch.device
    spec: DatasetSpec
    labels: dict[int, str]
    train_ids: list[str]
    val_ids: list[str]
    plan: TrainingPlan
    fingerprint: str
    net: torch.nn.Module
    model: torch.nn.Module
    network_config: dict[str, Any]
    pretrained: dict[str, Any] | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    channels_last: bool
    train_ds: Any
    val_ds: Any
    loader: Any
    sampler: Any
    steps: int
    loader_bs: int
    logger: Any
    started: float
    start_epoch: int = 0
    best_dice: float | None = None
    best_epoch: int | None = None
    last_val: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    rank_hashes: list[str] = field(default_factory=list)
    lineage: dict[str, Any] | None = None  # fine-tuning: {"parent": {...}, "corrections": [...]} for the card
    rehearsal: dict[str, Any] | None = None  # fine-tuning: what was rehearsed on (the card's "rehearsal")
    parent_state: dict[str, torch.Tensor] | None = None  # fine-tuning: the parent's weights (CPU), for parent_weight
    teacher: torch.nn.Module | None = None  # fine-tuning: the frozen parent, for finetune.distill_weight

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def samples_per_step(self) -> int:
        """Patches per optimiser step over all ranks."""
        return self.loader_bs * self.cfg.augment.samples_per_volume * self.dist.world


@dataclass
class EpochStats:
    """What one training pass (:func:`train_one_epoch`) measured."""

    train_loss: float
    seconds: float
    steps: int
    lr: float
    task: Any = None  # the epoch's progress-bar task


# ---------------------------------------------------------------------------------- phase: set-up
def set_up(cfg: TrainConfig, resume: bool = False, given_plan: TrainingPlan | None = None) -> TrainingRun:
    """Everything before the first epoch: process (device, DDP, threads, determinism), cases and
    split, plan (fresh, given, or the resumed run's), network (pretrained encoder), optimiser,
    schedule, resume state, data loader; rank 0 writes ``config.yaml`` and ``plan.json``.

    Raises:
        ConfigError, DatasetError, ModelError: as :func:`train` says.
    """
    from monai.data import set_track_meta

    cfg.check()
    if not cfg.data or not cfg.out:
        raise ConfigError("both the dataset folder (--data) and the run folder (--out) are needed")
    out = Path(cfg.out)
    t_start = time.time()
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    d = _init_distributed("cuda" if want_cuda else "cpu")
    device = _device(cfg, d)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    set_track_meta(False)  # plain tensors through the transforms: faster, and nothing needs the metadata

    pretrained_sd = None
    if cfg.model.pretrained and not resume:  # a file that does not fit stops the run before any work
        from resunet.nets.pretrained import check_pretrained_file

        pretrained_sd = check_pretrained_file(cfg.model.pretrained, cfg.model.preset)
    spec = load_dataset(cfg.data)
    if not cfg.dataset.val_cases:
        folds, note = effective_folds(len(spec.cases), cfg.dataset.folds)
        if note is not None:
            if cfg.dataset.fold >= folds:
                raise ConfigError(f"dataset.fold={cfg.dataset.fold}, but {len(spec.cases)} case(s) allow only "
                                  f"{folds} fold(s); choose a fold in 0..{folds - 1}")
            if d.main:
                log.warning("%s", note)
            cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, folds=folds))
    labels = {int(k): v for k, v in (cfg.labels or {}).items()} or spec.labels
    if cfg.finetune.init_from and not resume and not cfg.dataset.val_cases and cfg.finetune.holdout > 0:
        cfg = _finetune_split(cfg, [c.case_id for c in spec.cases], d.main)
    train_ids, val_ids = split_cases([c.case_id for c in spec.cases], cfg.dataset.folds, cfg.dataset.fold,
                                     cfg.dataset.split_seed, cfg.dataset.val_cases)
    if not train_ids:
        raise DatasetError(f"dataset {spec.root}: no cases left for training after holding out {len(val_ids)} for validation")

    # ---- plan (fresh) or reuse the run's plan (resume) ----------------------------------------
    last_path = out / "last.pt"
    resume_ckpt: Checkpoint | None = None
    parent_ckpt: Checkpoint | None = None
    if resume:
        if not last_path.exists():
            raise ConfigError(f"--resume: {last_path} does not exist; start without --resume")
        resume_ckpt = load_checkpoint(last_path)
        if resume_ckpt.train_state is None:
            raise ConfigError(f"--resume: {last_path} holds no training state")
        plan = TrainingPlan.from_dict(resume_ckpt.plan)
    elif cfg.finetune.init_from:
        parent_ckpt, plan, cfg = _parent_plan(cfg, spec)
    elif given_plan is not None:
        plan = given_plan
    else:
        from resunet.nets.presets import merged_kwargs, preset_kwargs

        stats = collect_stats(spec, train_ids, seed=cfg.seed)
        # the planner sees the preset with the user's overrides
        preset = merged_kwargs(preset_kwargs(cfg.model.preset), cfg.model.overrides)
        plan = make_plan(spec, stats, cfg.plan, preset=preset,
                         spatial_dims=cfg.model.spatial_dims, slice_axis=cfg.dataset.slice_axis)
    fingerprint = spec.fingerprint()

    # ---- model, optimiser, schedule ------------------------------------------------------------
    _seed_all(cfg.seed)
    lineage: dict[str, Any] | None = None
    if resume_ckpt is not None and resume_ckpt.model_card.get("parent"):
        from resunet.nets import ResUNet

        net = ResUNet.from_config(dict(resume_ckpt.network))  # the parent's architecture, weights below
        lineage = {"parent": resume_ckpt.model_card["parent"],
                   "corrections": resume_ckpt.model_card.get("corrections") or []}
    elif parent_ckpt is not None:
        net = parent_ckpt.build_network().train()  # step 0 = the parent's weights
        lineage = _lineage(parent_ckpt, spec)
    rehearsal_spec, rehearsal = None, None
    if resume_ckpt is not None and resume_ckpt.model_card.get("rehearsal"):
        rehearsal = resume_ckpt.model_card["rehearsal"]
        if rehearsal.get("dataset_root"):
            rehearsal_spec = load_dataset(rehearsal["dataset_root"])
    elif parent_ckpt is not None:
        from resunet.training.rehearsal import rehearsal_dataset

        rehearsal_spec, line = rehearsal_dataset(cfg.finetune.rehearse, parent_ckpt, out)
        if d.main:
            log.info("fine-tuning: %s", line)
        if rehearsal_spec is not None and cfg.finetune.rehearse_fraction <= 0:
            rehearsal_spec, line = None, "no rehearsal (finetune.rehearse_fraction is 0)"
        rehearsal = {"summary": line, "setting": cfg.finetune.rehearse, "fraction": cfg.finetune.rehearse_fraction}
        if rehearsal_spec is not None:
            rehearsal.update({"dataset": rehearsal_spec.name, "dataset_root": str(rehearsal_spec.root),
                              "cases": [c.case_id for c in rehearsal_spec.cases],
                              "fingerprint": rehearsal_spec.fingerprint()})
    else:
        net = build_network(cfg, plan, len(spec.channels), len(labels))
    masked_spec = None
    if cfg.finetune.init_from and cfg.finetune.masked_copies > 0:
        from resunet.training.rehearsal import masked_copies_dataset

        masked_spec = masked_copies_dataset(spec, train_ids + val_ids, out / "masked_corrections")
        if d.main:
            log.info("fine-tuning: masked copies (finetune.masked_copies) of the %d training corrections (trained on) "
                     "and of the %d held-out one(s) (validated on) in %s", len(train_ids), len(val_ids),
                     out / "masked_corrections")
    network_config = net.config
    pretrained: dict[str, Any] | None = None
    if resume_ckpt is not None:
        pretrained = resume_ckpt.model_card.get("pretrained")
    elif cfg.model.pretrained:
        from resunet.nets.pretrained import load_pretrained_file

        pretrained = load_pretrained_file(net, cfg.model.pretrained, state_dict=pretrained_sd)
        del pretrained_sd
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_sha256=pretrained["sha256"]))
        if d.main:
            log.info("encoder initialised from %s (torchvision %s, sha256 %s)", pretrained["file"], pretrained["arch"],
                     pretrained["sha256"][:12])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        plan.save(out / "plan.json")
    net.to(device)
    channels_last = _channels_last(cfg, device, plan.spatial_dims)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d if plan.spatial_dims == 3 else torch.channels_last)
    parent_state = None
    teacher = None
    if cfg.finetune.init_from and cfg.finetune.distill_weight > 0 and rehearsal_spec is not None:
        import copy

        teacher = copy.deepcopy(net).eval().requires_grad_(False)  # the parent as it is now (step 0 / resumed: below)
        if resume_ckpt is not None:
            teacher.load_state_dict(load_checkpoint(cfg.finetune.init_from).state_dict)
    if cfg.finetune.init_from:
        params: Any = _finetune_params(cfg, net)
        if cfg.finetune.parent_weight > 0:
            parent_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if resume_ckpt is not None:  # the parent's weights, not the resumed ones
                parent_state = {k: v.detach().cpu().clone() for k, v in
                                load_checkpoint(cfg.finetune.init_from).state_dict.items()}
    else:
        params = net.parameters()
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    amp_dtype = _amp(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = build_loss(cfg, cfg.model.deep_supervision)
    start_epoch, best_dice, best_epoch = 0, None, None
    if resume_ckpt is not None:
        st = resume_ckpt.train_state or {}
        net.load_state_dict(resume_ckpt.state_dict)
        optimizer.load_state_dict(st["optimizer"])
        start_epoch = int(st["epoch"])
        planned = resume_ckpt.model_card.get("epochs")
        if planned is not None and int(planned) != cfg.epochs and cfg.optim.scheduler != "plateau":
            # The saved schedule runs to the old total (poly would sit at lr 0 after it): rebuild it
            # for the new total and advance it to where the run stands.
            log.warning("resuming a run planned for %d epochs with --epochs %d: the learning-rate schedule is "
                        "recomputed for %d epochs and continues at epoch %d", int(planned), cfg.epochs,
                        cfg.epochs, start_epoch + 1)
            scheduler = _advanced_scheduler(cfg, optimizer, start_epoch)
        else:
            scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        best_dice, best_epoch = st.get("best_dice"), st.get("best_epoch")
        _set_rng_state(st["rng"])
        if start_epoch >= cfg.epochs:
            log.info("run %s already finished %d epochs", out, start_epoch)
    model: torch.nn.Module = net
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- data ------------------------------------------------------------------------------------
    from monai.data import DataLoader

    train_ds, val_ds = _datasets(cfg, spec, plan, train_ids, val_ids, out, rehearsal_spec, masked_spec)
    spv = cfg.augment.samples_per_volume
    loader_bs = max(1, plan.batch_size // spv)
    steps = cfg.iterations_per_epoch or max(1, math.ceil(len(train_ids) * spv / (loader_bs * spv * d.world)))
    n_rehearse = len(rehearsal_spec.cases) if rehearsal_spec is not None else 0
    n_masked = len(train_ids) if masked_spec is not None else 0  # one copy per training correction
    sampler = _EpochSampler(len(train_ids), steps * loader_bs, d, cfg.seed, n_rehearse, cfg.finetune.rehearse_fraction,
                            n_masked, cfg.finetune.masked_copies)
    loader = DataLoader(train_ds, batch_size=loader_bs, sampler=sampler, num_workers=cfg.dataset.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=False)
    logger = _Logger(out, d.main, cfg.tensorboard, start_epoch)
    if d.main:
        log.info("training %s: %d train / %d val cases, patch %s, batch %d (%d per rank), %d steps/epoch, device %s%s",
                 spec.name, len(train_ids), len(val_ids), plan.patch_size, loader_bs * spv * d.world, loader_bs * spv,
                 steps, device, f", {d.world} processes" if d.enabled else "")
    return TrainingRun(
        cfg=cfg, out=out, dist=d, device=device, spec=spec, labels=labels, train_ids=train_ids, val_ids=val_ids,
        plan=plan, fingerprint=fingerprint, net=net, model=model, network_config=network_config,
        pretrained=pretrained, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype,
        loss_fn=loss_fn, channels_last=channels_last, train_ds=train_ds, val_ds=val_ds, loader=loader,
        sampler=sampler, steps=steps, loader_bs=loader_bs, logger=logger, started=t_start,
        start_epoch=start_epoch, best_dice=best_dice, best_epoch=best_epoch, lineage=lineage, rehearsal=rehearsal,
        parent_state=parent_state, teacher=teacher)


def _finetune_split(cfg: TrainConfig, case_ids: list[str], main: bool) -> TrainConfig:
    """Fine-tuning's split: ``finetune.holdout`` corrections kept out to choose the epoch (from
    ``finetune.holdout_min_cases`` cases on, picked by the ``dataset.split_seed`` shuffle), else all
    trained on without validation. Returns ``cfg`` with ``dataset.val_cases`` / ``folds`` set."""
    ft = cfg.finetune
    ids = sorted(case_ids)
    if len(ids) >= ft.holdout_min_cases:
        order = np.random.default_rng(cfg.dataset.split_seed).permutation(len(ids))
        val = sorted(ids[i] for i in order[:ft.holdout])
        if main:
            log.info("fine-tuning: %d of %d cases held out to choose the epoch (the parent is epoch 0)", len(val), len(ids))
        return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, val_cases=val))
    if main:
        log.warning("fine-tuning on %d case(s): fewer than finetune.holdout_min_cases=%d, so none is held out and "
                    "best.pt is the last epoch; check the model on cases of your own before deploying it",
                    len(ids), ft.holdout_min_cases)
    return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, folds=1, fold=0))


def _frozen_decoder_prefixes(cfg: TrainConfig, net: torch.nn.Module) -> list[str]:
    """Parameter-name prefixes of the decoder levels that ``finetune.freeze_decoder_levels`` keeps at the
    parent's weights: the coarsest ones (``decoder.0`` is the level next to the bottleneck).

    Raises:
        ConfigError: more levels asked for than the network has (then nothing of the decoder would learn).
    """
    n = cfg.finetune.freeze_decoder_levels
    levels = len(getattr(net, "decoder", ()))
    if n >= levels > 0 or (n and not levels):
        raise ConfigError(f"finetune.freeze_decoder_levels={n}, but the parent's decoder has {levels} level(s); "
                          f"freeze at most {max(levels - 1, 0)} so that some of the decoder learns")
    return [f"decoder.{i}." for i in range(n)]


#: the encoder's first stage (``finetune.train_only="stem"``): the stem convolution and norm, and ``layer1``
_STEM_PREFIXES = ("encoder.conv1.", "encoder.bn1.", "encoder.layer1.")


def _train_only_names(which: str, net: torch.nn.Module) -> set[str]:
    """Names of the parameters that learn under ``finetune.train_only`` (``"norm"``: every normalisation
    layer's affine weight and bias; ``"stem"``: the encoder's first stage); all others keep the parent's."""
    if which == "norm":
        norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
        names = {f"{m}.{n}" if m else n for m, mod in net.named_modules() if isinstance(mod, norms)
                 for n, _ in mod.named_parameters(recurse=False)}
    else:
        names = {n for n, _ in net.named_parameters() if n.startswith(_STEM_PREFIXES)}
    if not names:
        raise ConfigError(f"finetune.train_only={which!r}: the parent network has no such parameters "
                          f"({'no affine normalisation layers' if which == 'norm' else 'no encoder stem'}); "
                          "leave finetune.train_only unset")
    return names


def _finetune_params(cfg: TrainConfig, net: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimiser's parameter groups of a fine-tuning run: the encoder frozen (``finetune.freeze_encoder``:
    ``requires_grad`` off, not in the optimiser) or at ``finetune.encoder_lr_scale`` times the learning rate;
    the coarsest ``finetune.freeze_decoder_levels`` decoder levels frozen as well."""
    ft = cfg.finetune
    if ft.train_only:
        learn = _train_only_names(ft.train_only, net)
        for n, p in net.named_parameters():
            p.requires_grad_(n in learn)
        return [{"params": [p for n, p in net.named_parameters() if n in learn]}]
    frozen_dec = _frozen_decoder_prefixes(cfg, net)
    encoder = [p for n, p in net.named_parameters() if n.startswith("encoder.")]
    decoder_frozen = [p for n, p in net.named_parameters() if any(n.startswith(f) for f in frozen_dec)]
    rest = [p for n, p in net.named_parameters()
            if not n.startswith("encoder.") and not any(n.startswith(f) for f in frozen_dec)]
    for p in decoder_frozen:
        p.requires_grad_(False)
    if ft.freeze_encoder:
        for p in encoder:
            p.requires_grad_(False)
        return [{"params": rest}]
    if ft.encoder_lr_scale != 1.0:
        return [{"params": rest}, {"params": encoder, "lr": cfg.optim.lr * ft.encoder_lr_scale}]
    return [{"params": rest + encoder}]


def validate_parent(run: TrainingRun) -> None:
    """Fine-tuning, before the first epoch: validate the parent on the held-out correction(s) as
    epoch 0 and write it as ``best.pt``, so only an epoch that does better replaces it."""
    if run.lineage is None or run.val_ds is None or run.start_epoch != 0:
        return
    cfg, d = run.cfg, run.dist
    val = None
    if d.main:
        val = validate(run.net, run.val_ds, run.plan, cfg, run.device, len(run.labels), run.amp_dtype)
    if d.enabled:
        obj = [val]
        dist.broadcast_object_list(obj, src=0)
        val = obj[0]
    assert val is not None
    run.best_dice, run.best_epoch, run.last_val = val["dice_mean"], 0, val
    row: dict[str, Any] = {"epoch": 0, "time_s": "", "samples_per_s": "", "lr": "", "train_loss": "",
                           "val_dice": round(val["dice_mean"], 6)}
    for k in range(1, len(run.labels)):
        row[f"val_dice_{run.labels[k]}"] = round(val[f"dice_{k}"], 6)
    run.history.append(row)
    if d.main:
        run.logger.write(row)
        save_run_checkpoint(run, run.out / "best.pt", 0, {"val_dice": val, "epoch": 0}, with_state=False)
        log.info("epoch 0 (the parent): val dice %.4f", val["dice_mean"])
    if d.enabled:
        dist.barrier()


def _parent_plan(cfg: TrainConfig, spec: DatasetSpec) -> tuple[Checkpoint, TrainingPlan, TrainConfig]:
    """Fine-tuning: the parent checkpoint, its plan (not re-planned) and ``cfg`` with the parent's model settings.

    Raises:
        DatasetError: the dataset's labels or channel count are not the parent's (the output layer
            would mean other things).
        ModelError: the parent is not a readable resunet checkpoint.
    """
    if cfg.model.pretrained:
        raise ConfigError("--init-from and --pretrained both set the starting weights; pass one of them")
    parent = load_checkpoint(cfg.finetune.init_from)
    parent_labels = {int(k): str(v) for k, v in parent.labels.items()}
    if spec.labels != parent_labels:
        raise DatasetError(
            f"dataset {spec.root}: its labels ({_labels_text(spec.labels)}) are not those of the model in "
            f"{Path(cfg.finetune.init_from).name} ({_labels_text(parent_labels)}); fine-tuning keeps the parent's "
            "output layer, so export corrections made with that model (resunet corrections export --model NAME)")
    if len(spec.channels) != len(parent.channels):
        raise DatasetError(f"dataset {spec.root}: {len(spec.channels)} input channel(s) ({', '.join(spec.channels)}), "
                           f"but the model in {Path(cfg.finetune.init_from).name} takes {len(parent.channels)} "
                           f"({', '.join(parent.channels)})")
    plan = TrainingPlan.from_dict(parent.plan)
    model = dataclasses.replace(cfg.model, preset=str(parent.model_card.get("preset") or cfg.model.preset),
                                spatial_dims=plan.spatial_dims,
                                deep_supervision=bool(parent.network.get("deep_supervision", cfg.model.deep_supervision)))
    return parent, plan, dataclasses.replace(cfg, model=model)


def _labels_text(labels: dict[int, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _lineage(parent: Checkpoint, spec: DatasetSpec) -> dict[str, Any]:
    """What the child's card says of where it came from: the parent (name, sha256, file) and the corrections."""
    from resunet.training.corrections import read_corrections

    card = parent.model_card
    info = {"name": str(card.get("name") or Path(str(parent.path)).stem), "sha256": parent.sha256,
            "file": Path(str(parent.path)).name}
    if card.get("parent"):
        info["parent"] = card["parent"]  # the grandparent and above: the whole line
    corrections = [{"case_id": c["case_id"], "decision_id": c["decision_id"]} for c in read_corrections(spec.root)]
    return {"parent": info, "corrections": corrections}


# ------------------------------------------------------------------------------- phase: one epoch
def train_one_epoch(run: TrainingRun, epoch: int, progress: Any) -> EpochStats:
    """One pass over the epoch's patches (0-based ``epoch``): every random source re-seeded from
    ``(seed, epoch, rank)`` first, one optimiser step per batch; the mean loss over all ranks."""
    cfg, d, device, model, optimizer, scaler = run.cfg, run.dist, run.device, run.model, run.optimizer, run.scaler
    es = _epoch_seed(cfg.seed, epoch, d.rank)
    _seed_all(es)
    _seed_transforms(run.train_ds, es)
    run.sampler.set_epoch(epoch)
    model.train()
    if cfg.finetune.init_from and cfg.finetune.freeze_encoder and not cfg.finetune.train_only:
        run.net.encoder.eval()  # frozen: its norm layers keep the parent's statistics too
    if cfg.finetune.init_from and not cfg.finetune.train_only:
        for i in range(cfg.finetune.freeze_decoder_levels):
            run.net.decoder[i].eval()  # frozen decoder levels (finetune.freeze_decoder_levels) likewise
    t0 = time.time()
    losses: list[float] = []
    task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=run.steps, info="")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for batch in run.loader:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True).float()
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            outputs = model(x)
        if isinstance(outputs, (list, tuple)):
            outputs = [o.float() for o in outputs]
        else:
            outputs = outputs.float()
        loss = run.loss_fn(outputs, y)
        if run.teacher is not None and "rehearsal" in batch and bool(batch["rehearsal"].any()):
            loss = loss + cfg.finetune.distill_weight * _distill_loss(run.teacher, x, outputs, batch["rehearsal"], ctx)
        if not torch.isfinite(loss):
            raise ConfigError(f"epoch {epoch + 1}: the loss became {float(loss)}; lower optim.lr or use amp: none")
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        mem = f" mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        speed = len(losses) / max(time.time() - t0, 1e-9)
        progress.update(task, advance=1, info=f"{speed:.2f} it/s loss {np.mean(losses):.4f}{mem}")
    train_loss = float(np.mean(losses)) if losses else float("nan")
    if d.enabled:
        t = torch.tensor([train_loss], device=device)
        dist.all_reduce(t)
        train_loss = float(t) / d.world
    return EpochStats(train_loss=train_loss, seconds=time.time() - t0, steps=len(losses),
                      lr=optimizer.param_groups[0]["lr"], task=task)


# ---------------------------------------------------------------------------- phase: end of epoch
def _distill_loss(teacher: torch.nn.Module, x: torch.Tensor, outputs: Any, rehearsal: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Learning without forgetting (Li & Hoiem 2017) on the rehearsal draws: the KL divergence of the
    child's softmax from the parent's (full-resolution output), averaged over the rehearsal samples' voxels."""
    rows = rehearsal.to(x.device).bool().reshape(-1)
    with torch.no_grad(), ctx:
        target = teacher(x[rows])
    target = (target[0] if isinstance(target, (list, tuple)) else target).float()
    child = (outputs[0] if isinstance(outputs, (list, tuple)) else outputs)[rows]
    kl = F.kl_div(F.log_softmax(child, 1), F.log_softmax(target, 1), log_target=True, reduction="none")
    return kl.sum(1).mean()


def end_of_epoch(run: TrainingRun, epoch: int, stats: EpochStats, progress: Any = None) -> dict[str, Any]:
    """After the pass of epoch ``epoch`` (0-based): validation when due (rank 0, shared with every
    rank), the schedule's step, the best Dice, the log row, ``best.pt`` when improved and ``last.pt``
    (the resume point). Returns the log row."""
    cfg, d, device, labels = run.cfg, run.dist, run.device, run.labels
    # ---- validation (rank 0), shared with all ranks for the plateau schedule ---------
    val: dict[str, float] | None = None
    is_last = epoch + 1 == cfg.epochs
    if run.val_ds is not None and ((epoch + 1) % cfg.validation.every == 0 or is_last):
        if d.main:
            val = validate(run.net, run.val_ds, run.plan, cfg, device, len(labels), run.amp_dtype)
        if d.enabled:
            obj = [val]
            dist.broadcast_object_list(obj, src=0)
            val = obj[0]
        run.last_val = val
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val is not None:
            run.scheduler.step(val["dice_mean"])
    else:
        run.scheduler.step()
    improved = val is not None and (run.best_dice is None or val["dice_mean"] > run.best_dice)
    if improved:
        run.best_dice, run.best_epoch = val["dice_mean"], epoch + 1  # type: ignore[index]
    row: dict[str, Any] = {
        "epoch": epoch + 1, "time_s": round(stats.seconds, 3),
        "samples_per_s": round(stats.steps * run.samples_per_step / max(stats.seconds, 1e-9), 3),
        "lr": stats.lr, "train_loss": round(stats.train_loss, 6),
        "val_dice": round(val["dice_mean"], 6) if val else "",
    }
    for k in range(1, len(labels)):
        row[f"val_dice_{labels[k]}"] = round(val[f"dice_{k}"], 6) if val else ""
    row["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else ""
    row["gpu_util"] = _gpu_util(device)
    run.history.append(row)
    if progress is not None and stats.task is not None:
        progress.update(stats.task, info=f"loss {stats.train_loss:.4f}" + (f" val dice {val['dice_mean']:.4f}" if val else ""))
    run.rank_hashes = _rank_weight_hashes(run.net, d)
    if d.main:
        run.logger.write(row)
        metrics = {"val_dice": val, "epoch": epoch + 1} if val else {"epoch": epoch + 1}
        if improved:
            save_run_checkpoint(run, run.out / "best.pt", epoch + 1, metrics, with_state=False)
        save_run_checkpoint(run, run.last_path, epoch + 1, metrics, with_state=True)
        log.info("epoch %d/%d: loss %.4f%s, %.1f s, lr %.3g", epoch + 1, cfg.epochs, stats.train_loss,
                 f", val dice {val['dice_mean']:.4f}" if val else "", stats.seconds, stats.lr)
    if d.enabled:
        dist.barrier()
    return row


def finish(run: TrainingRun) -> TrainResult:
    """After the last epoch: ``best.pt`` = the final weights when nothing was validated, the held-out
    cases predicted from ``best.pt`` (``validation.save_predictions``), the result."""
    cfg, d, out = run.cfg, run.dist, run.out
    if d.main and not (out / "best.pt").exists():
        # no validation set: best = the final weights
        save_run_checkpoint(run, out / "best.pt", cfg.epochs, {"val_dice": run.last_val} if run.last_val else {},
                            with_state=False)
    if d.main and run.lineage is not None and run.best_epoch == 0:
        log.warning("fine-tuning did not beat the parent on the held-out correction(s) (val dice %.4f at epoch 0): "
                    "best.pt holds the parent's weights", run.best_dice)
    if d.main and run.parent_state is not None and run.best_epoch != 0:
        _average_with_parent(run, out / "best.pt")
    run.logger.close()
    if d.main and cfg.validation.save_predictions and run.val_ids:
        write_validation_predictions(out / "best.pt", run.spec, run.val_ids, out / "validation", run.device, cfg)
    if d.enabled:
        dist.barrier()
    return TrainResult(out=out, epochs=cfg.epochs, best_dice=run.best_dice, best_epoch=run.best_epoch,
                       last_dice=run.last_val["dice_mean"] if run.last_val else None,
                       seconds=time.time() - run.started, history=run.history)


def _average_with_parent(run: TrainingRun, path: Path) -> None:
    """``finetune.parent_weight`` (WiSE-FT, Wortsman et al. 2022): rewrite ``path`` with the weights
    ``w * parent + (1 - w) * fine-tuned``, validated again when there is a held-out case."""
    w = run.cfg.finetune.parent_weight
    best = load_checkpoint(path)
    assert run.parent_state is not None
    mixed = {k: (w * run.parent_state[k].float() + (1 - w) * v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in best.state_dict.items()}
    training = {k: v.detach().clone() for k, v in run.net.state_dict().items()}
    run.net.load_state_dict(mixed)
    metrics = dict(best.model_card.get("metrics") or {})
    if run.val_ds is not None:
        metrics["val_dice"] = validate(run.net, run.val_ds, run.plan, run.cfg, run.device, len(run.labels), run.amp_dtype)
        log.info("best.pt averaged with the parent (parent_weight %.2f): val dice %.4f", w, metrics["val_dice"]["dice_mean"])
    metrics["parent_weight"] = w
    save_run_checkpoint(run, path, int(metrics.get("epoch") or run.cfg.epochs), metrics, with_state=False)
    run.net.load_state_dict(training)


def model_card(run: TrainingRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model card: data, split, metrics, pretrained encoder, cross-validation, the user's card."""
    cfg, plan, spec = run.cfg, run.plan, run.spec
    base = {"name": Path(cfg.out).name, "preset": cfg.model.preset, "spatial_dims": plan.spatial_dims,
            "training_data": {"dataset": spec.name, "layout": spec.layout, "cases": len(spec.cases),
                              "train_cases": run.train_ids, "val_cases": run.val_ids, "fingerprint": run.fingerprint},
            "metrics": metrics, "epochs": cfg.epochs}
    if run.pretrained is not None:
        base["pretrained"] = run.pretrained
    if run.lineage is not None:
        base.update(run.lineage)  # "parent" and "corrections" (fine-tuning, resunet train --init-from)
        ft = cfg.finetune
        base["rehearsal"] = run.rehearsal
        base["finetune"] = {"lr": cfg.optim.lr, "epochs": cfg.epochs, "freeze_encoder": ft.freeze_encoder,
                            "encoder_lr_scale": ft.encoder_lr_scale, "parent_weight": ft.parent_weight,
                            "freeze_decoder_levels": ft.freeze_decoder_levels, "masked_copies": ft.masked_copies,
                            "train_only": ft.train_only, "distill_weight": ft.distill_weight,
                            "holdout_cases": run.val_ids, "best_epoch": run.best_epoch}
    if run.val_ids or cfg.dataset.folds > 1:
        base["cross_validation"] = {"folds": cfg.dataset.folds, "fold": cfg.dataset.fold,
                                    "split_seed": cfg.dataset.split_seed}
    base.update(cfg.model_card)
    return base


def save_run_checkpoint(run: TrainingRun, path: Path, epoch: int, metrics: dict[str, Any], with_state: bool) -> None:
    """Write ``best.pt`` (``with_state=False``) or ``last.pt`` (optimiser, schedule, scaler, RNG, epoch: the resume point)."""
    state = None
    if with_state:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None, "epoch": epoch,
                 "best_dice": run.best_dice, "best_epoch": run.best_epoch, "rng": _rng_state(),
                 "world_size": run.dist.world, "rank_weight_sha256": run.rank_hashes}
    labels = run.labels
    save_checkpoint(path, state_dict=run.net.state_dict(), network=run.network_config, plan=run.plan.to_dict(),
                    labels={k: labels[k] for k in sorted(labels)}, channels=run.spec.channels,
                    postprocess=run.cfg.postprocess, model_card=model_card(run, metrics), fingerprint=run.fingerprint,
                    versions=software_versions(), train_state=state)


# ------------------------------------------------------------------------- cross-validation folds
def write_validation_predictions(model: Path, spec: DatasetSpec, case_ids: list[str], out_dir: Path,
                                 device: torch.device, cfg: TrainConfig) -> list[Path]:
    """Predict each held-out case with ``model`` into ``out_dir/<case>.nii.gz`` on the case's own grid.

    The very :class:`resunet.inference.Predictor` ``resunet predict`` uses (preprocessing, sliding
    window with the validation overlap, TTA per ``validation.tta``, post-processing), so
    ``resunet evaluate --pred out_dir --gt DATASET/labelsTr`` scores the fold as users will run it.
    """
    from resunet.io.nifti import write_mask_nifti
    from resunet.training.dataset import read_case

    predictor = Predictor(model, device=device, tta=cfg.validation.tta, overlap=cfg.validation.overlap,
                          sw_batch=cfg.validation.sw_batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id in case_ids:
        images, _ = read_case(spec, spec.case(case_id))
        pred = predictor.predict(images)
        path = out_dir / f"{case_id}.nii.gz"
        write_mask_nifti(pred.mask, path)
        written.append(path)
    log.info("validation predictions of %d case(s) in %s", len(written), out_dir)
    return written


def train_folds(cfg: TrainConfig, *, resume: bool = False) -> list[TrainResult]:
    """``resunet train --fold all``: every cross-validation fold, one after the other, into ``RUN/fold_<k>/``.

    The plan is made once from all cases (as nnU-Net does), saved as ``RUN/plan.json`` and shared
    by every fold, so the folds' ``best.pt`` files form an ensemble (``resunet predict --model RUN``).
    Each fold writes its held-out cases' predictions to ``RUN/fold_<k>/validation/``; they are also
    gathered in ``RUN/crossval/`` (every case predicted by the fold that did not train on it).
    ``RUN/config.yaml`` holds the shared settings, ``RUN/folds.json`` each fold's cases, Dice and
    checkpoint hash. With ``resume`` finished folds are kept and the others continue or start.
    """
    import shutil

    from resunet.io.hashing import sha256_file

    cfg.check()
    if not cfg.data or not cfg.out:
        raise ConfigError("both the dataset folder (--data) and the run folder (--out) are needed")
    if cfg.dataset.val_cases:
        raise ConfigError("--fold all splits by dataset.folds; unset dataset.val_cases")
    root = Path(cfg.out)
    spec = load_dataset(cfg.data)
    folds, note = effective_folds(len(spec.cases), cfg.dataset.folds)
    main = int(os.environ.get("RANK", "0")) == 0
    if note is not None and main:
        log.warning("%s", note)
    if folds < 2:
        raise DatasetError(f"dataset {spec.root}: {len(spec.cases)} case(s) give no cross-validation folds; "
                           "train without --fold all")
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, folds=folds, fold=0),
                              validation=dataclasses.replace(cfg.validation, save_predictions=True))
    plan_path = root / "plan.json"
    if resume and plan_path.exists():
        plan = TrainingPlan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")))
    else:
        from resunet.nets.presets import merged_kwargs, preset_kwargs

        stats = collect_stats(spec, None, seed=cfg.seed)
        preset = merged_kwargs(preset_kwargs(cfg.model.preset), cfg.model.overrides)
        plan = make_plan(spec, stats, cfg.plan, preset=preset, spatial_dims=cfg.model.spatial_dims,
                         slice_axis=cfg.dataset.slice_axis)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        cfg.save(root / "config.yaml")
        plan.save(plan_path)
    results = []
    summary = []
    for k in range(folds):
        fold_cfg = dataclasses.replace(cfg, out=str(root / f"fold_{k}"),
                                       dataset=dataclasses.replace(cfg.dataset, fold=k))
        fold_resume = resume and (root / f"fold_{k}" / "last.pt").exists()
        if main:
            log.info("fold %d of %d", k + 1, folds)
        res = train(fold_cfg, resume=fold_resume, plan=plan)
        results.append(res)
        if main:
            best = root / f"fold_{k}" / "best.pt"
            card = load_checkpoint(best).model_card
            summary.append({"fold": k, "out": f"fold_{k}", "val_cases": card["training_data"]["val_cases"],
                            "best_dice": res.best_dice, "best_epoch": res.best_epoch,
                            "best_sha256": sha256_file(best)})
    if main:
        cross = root / "crossval"
        cross.mkdir(exist_ok=True)
        for k in range(folds):
            for f in sorted((root / f"fold_{k}" / "validation").glob("*.nii.gz")):
                shutil.copyfile(f, cross / f.name)
        atomic_write_text(root / "folds.json", json.dumps({"folds": summary, "plan": "plan.json",
                                                           "crossval": "crossval"}, indent=1) + "\n")
    return results
