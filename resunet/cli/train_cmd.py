"""``resunet train``: dataset folder -> run folder with best.pt, last.pt, log.csv, plan.json, config.yaml."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from resunet.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on an MSD or nnU-Net v2 raw dataset folder",
        description="Train a Residual U-Net. Writes RUN/config.yaml (fully resolved), plan.json, log.csv, "
        "last.pt (with resume state) and best.pt. Multi-GPU: torchrun --nproc_per_node=N -m resunet train ...",
    )
    p.add_argument("--data", required=True, help="dataset folder (MSD dataset.json 'training' list, or nnU-Net v2 raw)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--config", help="YAML config (any subset of the keys in RUN/config.yaml)")
    p.add_argument("--preset", help="network preset (e.g. tiny, cpu, small, base, resnet18, resnet34; cpu trains fastest on a CPU)")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), help="2 = train on slices, 3 = on volumes")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default auto)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last.pt (uses RUN/config.yaml)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--fold", type=_fold, metavar="K|all",
                   help="cross-validation fold held out for validation (0-based), or all: train every fold into "
                   "RUN/fold_<k>/ with a shared plan, write each fold's held-out predictions (RUN/fold_<k>/validation/, "
                   "all of them in RUN/crossval/) for `resunet evaluate`; `resunet predict --model RUN` ensembles the folds")
    p.add_argument("--pretrained", metavar="FILE",
                   help="local torchvision ResNet .pth (resnet18..152, wide_resnet50_2/101_2) that starts the encoder of "
                   "the matching --preset (2D as is, 3D inflated); file name and SHA-256 go into the model card")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune this deployed model (e.g. on resunet corrections export's dataset): its plan "
                   "(spacing, normalisation, patch) and architecture are kept, not re-planned; the weights start as "
                   "its own; fewer epochs and a lower learning rate (finetune.epochs, finetune.lr: --set finetune.epochs=N "
                   "changes them, --epochs / --set optim.lr win). Against forgetting what the parent knew: the encoder "
                   "stays the parent's (finetune.freeze_encoder; finetune.encoder_lr_scale instead; "
                   "finetune.freeze_decoder_levels=N keeps the N coarsest decoder levels too), the result is "
                   "averaged with the parent (finetune.parent_weight, 0.35), one correction is held out (from 6 on) "
                   "to choose the epoch, the parent counting as epoch 0, so a fine-tune that only gets worse keeps "
                   "the parent; --rehearse mixes the parent's training data into every epoch (off by default; "
                   "docs/training.md has the measurements behind each default). The new "
                   "model card names the parent (name, sha256), the corrections (case and decision ids) and the "
                   "rehearsal data. The dataset's labels must be the parent's")
    p.add_argument("--rehearse", metavar="DATASET",
                   help="with --init-from: mix the cases of this dataset folder (MSD or nnU-Net v2, the parent's labels; "
                   "e.g. the parent's own training data) into every fine-tuning epoch (finetune.rehearse; 'parent' = "
                   "the bundled model's own data, regenerated; default none = no rehearsal)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=0.01 --set dataset.num_workers=0 (repeatable)")
    p.set_defaults(func=run)


def _fold(text: str) -> int | str:
    if text.strip().lower() in ("all", "all-folds"):
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold takes a fold number (0-based) or all; got {text!r}") from None


def build_config(args: argparse.Namespace):
    """The resolved TrainConfig: defaults < --config (or RUN/config.yaml on --resume) < flags < --set."""
    from resunet.training.config import TrainConfig

    all_folds = getattr(args, "fold", None) == "all"
    run_cfg = Path(args.out) / "config.yaml"
    if args.resume and run_cfg.exists():
        cfg = TrainConfig.from_yaml(run_cfg)
    elif args.config:
        cfg = TrainConfig.from_yaml(args.config)
    else:
        cfg = TrainConfig()
    sets = [f"data={args.data}", f"out={args.out}"]
    if getattr(args, "init_from", None) and not args.resume:
        # fine-tuning defaults (TrainConfig.finetune, the one place); --set finetune.epochs/lr change
        # them (so they are read after --set), and --epochs, --set epochs / optim.lr still win
        ft = cfg.override(args.overrides).finetune
        sets += [f"epochs={ft.epochs}", f"optim.lr={ft.lr}", f"optim.warmup_epochs={ft.warmup_epochs}"]
    for flag, key in (("preset", "model.preset"), ("spatial_dims", "model.spatial_dims"), ("epochs", "epochs"),
                      ("device", "device"), ("seed", "seed"), ("fold", "dataset.fold"),
                      ("pretrained", "model.pretrained")):
        value = getattr(args, flag, None)
        if flag == "fold" and all_folds:
            continue
        if value is not None:
            sets.append(f"{key}={value}")
    cfg = cfg.override(sets)
    # data/out may contain characters YAML would reinterpret: set them verbatim
    cfg.data, cfg.out = str(args.data), str(args.out)
    if getattr(args, "pretrained", None):
        cfg.model.pretrained = str(args.pretrained)
    if getattr(args, "init_from", None):
        if getattr(args, "pretrained", None):
            raise ConfigError("--init-from and --pretrained both set the starting weights; pass one of them")
        if getattr(args, "fold", None) == "all":
            raise ConfigError("--init-from fine-tunes one model; it does not combine with --fold all")
        cfg.finetune.init_from = str(args.init_from)
        if getattr(args, "rehearse", None):
            cfg.finetune.rehearse = None if str(args.rehearse).lower() == "none" else str(args.rehearse)
    elif getattr(args, "rehearse", None):
        raise ConfigError("--rehearse mixes a dataset into fine-tuning; it needs --init-from CHECKPOINT")
    return cfg.override(args.overrides).check()


def run(args: argparse.Namespace) -> int:
    from resunet.training.loop import train, train_folds

    cfg = build_config(args)
    if not args.resume and ((Path(cfg.out) / "last.pt").exists() or (Path(cfg.out) / "fold_0" / "last.pt").exists()):
        raise ConfigError(f"{cfg.out} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    if args.fold == "all":
        results = train_folds(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        for k, r in enumerate(results):
            best = f"best val Dice {r.best_dice:.4f} at epoch {r.best_epoch}" if r.best_dice is not None else "no validation"
            print(f"fold {k}: {r.epochs} epochs in {r.seconds:.0f} s; {best}; {r.out}")
        print(f"{len(results)} folds in {cfg.out}; evaluate: resunet evaluate --pred {Path(cfg.out) / 'crossval'} "
              f"--gt LABELS --out REPORT; ensemble: resunet predict INPUT --model {cfg.out} --out DIR")
        return 0
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    best = f"best val Dice {result.best_dice:.4f} at epoch {result.best_epoch}" if result.best_dice is not None else "no validation"
    print(f"trained {result.epochs} epochs in {result.seconds:.0f} s; {best}; checkpoints in {result.out}")
    return 0
