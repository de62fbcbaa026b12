"""Rehearsal data for fine-tuning (``finetune.rehearse``): cases of the parent's training distribution.

Fine-tuning on a few corrections of one patient overfits that patient and the parent forgets what it
knew (catastrophic forgetting). Rehearsal (experience replay; e.g. Rolnick et al. 2019, "Experience
Replay for Continual Learning") mixes cases the parent was trained on into every fine-tuning epoch.

``finetune.rehearse`` is a dataset folder (MSD or nnU-Net v2 raw, the parent's labels and channel
count), or ``"parent"``: the parent's own training data where resunet can regenerate it. That is the
case for the bundled ``brain_extraction`` model (recognised by its training-data fingerprint): its
training set was the Colin27 example study shipped in the package plus simulated acquisitions of it
(data/model/simulate.py, about 15% skull-stripped). The example as it is and skull-stripped (image
times its brain mask) is written to ``RUN/rehearsal/``; the on-the-fly augmentation (rotation, zoom,
intensity, noise, blur, low resolution) stands in for the simulated acquisitions. For any other parent
``"parent"`` finds nothing and the run says in its log that no rehearsal is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from resunet.errors import DatasetError
from resunet.io.atomic import atomic_write_text
from resunet.training.checkpoint import Checkpoint
from resunet.training.dataset import DatasetSpec, load_dataset

log = logging.getLogger(__name__)

#: training-data fingerprints of the bundled models whose training data :func:`regenerate_parent_data`
#: can rebuild (model card ``training_data.fingerprint``), with the name of the recipe
REGENERABLE = {"48f257f149615979b812d130592581b997165c6a1861e0a19752d77baf987995": "brain_extraction"}


def rehearsal_dataset(setting: str | None, parent: Checkpoint, out: Path) -> tuple[DatasetSpec | None, str]:
    """The rehearsal dataset for fine-tuning ``parent`` and a line saying what it is (for the log).

    Args:
        setting: ``finetune.rehearse``: a dataset folder, ``"parent"`` or ``None``.
        parent: the parent checkpoint (its labels, channels and model card).
        out: the run folder (``"parent"`` data is written to ``out/rehearsal``).

    Raises:
        DatasetError: the named folder is not a dataset, or its labels / channels are not the parent's.
    """
    if not setting:
        return None, "no rehearsal (finetune.rehearse is unset): only the corrections are trained on"
    if setting == "parent":
        fingerprint = str((parent.model_card.get("training_data") or {}).get("fingerprint") or "")
        recipe = REGENERABLE.get(fingerprint)
        if recipe is None:
            return None, ("no rehearsal: the parent's training data is not known to resunet (only the bundled "
                          "brain_extraction model's is); pass --rehearse DATASET (e.g. the parent's training set) "
                          "to mix it into the fine-tuning")
        spec = regenerate_parent_data(out / "rehearsal")
        what = f"the parent's training data regenerated ({recipe}: {len(spec.cases)} cases in {out / 'rehearsal'})"
    else:
        spec = load_dataset(setting)
        what = f"dataset {spec.name} ({len(spec.cases)} cases)"
    parent_labels = {int(k): str(v) for k, v in parent.labels.items()}
    if spec.labels != parent_labels or len(spec.channels) != len(parent.channels):
        raise DatasetError(f"rehearsal dataset {spec.root}: labels {spec.labels} and {len(spec.channels)} channel(s), "
                           f"but the parent has labels {parent_labels} and {len(parent.channels)} channel(s); name a "
                           "dataset of the parent's task with --rehearse (or --rehearse none)")
    return spec, f"rehearsal on {what}"


def regenerate_parent_data(root: Path) -> DatasetSpec:
    """Write the bundled brain_extraction model's rehearsal set (MSD) at ``root``; reuse it when complete.

    Two cases from the package's example study (Colin27 T1, 2 mm, and its brain mask; not patient
    data): ``colin_orig`` as it is and ``colin_stripped`` (voxels outside the brain set to 0), the two
    kinds of input of the model's training set.
    """
    from resunet.io import read_nifti, write_nifti
    from resunet.package_data import EXAMPLE_BRAINMASK, EXAMPLE_T1

    meta_path = root / "dataset.json"
    if meta_path.exists():
        return load_dataset(root)
    image, mask = read_nifti(EXAMPLE_T1), read_nifti(EXAMPLE_BRAINMASK)
    brain = np.asarray(mask.array) > 0
    stripped = image.with_array(np.where(brain, np.asarray(image.array), 0).astype(np.asarray(image.array).dtype))
    label = mask.with_array(brain.astype(np.uint8), is_label=True)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    training = []
    for name, img in (("colin_orig", image), ("colin_stripped", stripped)):
        write_nifti(img, root / "imagesTr" / f"{name}.nii.gz")
        write_nifti(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta: dict[str, Any] = {"name": "brain_extraction_rehearsal", "description": "Colin27 example study (as is and "
                            "skull-stripped): the bundled brain_extraction model's training data, for rehearsal",
                            "modality": {"0": "T1"}, "labels": {"0": "background", "1": "brain"},
                            "numTraining": len(training), "training": training}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")  # last: marks the folder complete
    return load_dataset(root)


def mixed_draws(n_cases: int, n_rehearse: int, fraction: float, total: int, epoch: int = 0, n_masked: int = 0,
                masked_fraction: float = 0.0) -> list[int]:
    """``total`` dataset indices for epoch ``epoch`` (0-based): a share ``fraction`` are rehearsal cases.

    Indices ``0..n_cases-1`` are the fine-tuning cases and ``n_cases..n_cases+n_rehearse-1`` the
    rehearsal cases (a ConcatDataset's order); each group is cycled through in turn, and the cycle goes
    on from where the previous epoch stopped, so cases beyond one epoch's draws are drawn in later
    epochs (an epoch is a fixed number of draws, often fewer than the cases). Draw ``i`` is a
    rehearsal draw when ``floor((i + 1) * fraction)`` steps up, which spreads them evenly (the
    sampler shuffles the list afterwards).

    With ``n_masked`` masked copies of the fine-tuning cases (``finetune.masked_copies``; indices
    ``n_cases..n_cases+n_masked-1``, the rehearsal cases after them) a share ``masked_fraction`` of the
    fine-tuning (non-rehearsal) draws are masked copies, spread and cycled the same way, counted over
    the epochs (a share of 0.1 of 5 draws an epoch is one copy every second epoch).
    """
    n_r = int(total * fraction) if n_rehearse > 0 and fraction > 0 else 0  # rehearsal draws per epoch
    mf = masked_fraction if n_masked > 0 else 0.0
    nc = total - n_r  # fine-tuning draws per epoch; the masked share is spread over all epochs' of them, so a
    m = int(epoch * nc * mf)  # share below one draw per epoch still gives a copy every few epochs
    c, r = epoch * nc - m, epoch * n_r
    out, j = [], epoch * nc
    for i in range(total):
        if n_r and int((i + 1) * fraction) > int(i * fraction):
            out.append(n_cases + n_masked + r % n_rehearse)
            r += 1
            continue
        if mf and int((j + 1) * mf) > int(j * mf):
            out.append(n_cases + m % n_masked)
            m += 1
        else:
            out.append(c % n_cases)
            c += 1
        j += 1
    return out


def masked_copies_dataset(spec: DatasetSpec, case_ids: list[str], root: Path) -> DatasetSpec:
    """Masked copies of the training corrections (``finetune.masked_copies``), an MSD dataset at ``root``.

    For each case in ``case_ids`` (the training run's corrections: the training ones are trained on,
    the held-out ones' copies only validated on, next to the held-out cases themselves) the image
    with every voxel outside its label's foreground (label > 0) set to the image's background value,
    and the same label map: the new site's contrast as an already-cropped input (for a brain-extraction
    model, a skull-stripped head), which must keep its whole foreground. The background value is the
    median of the voxels on the array's six faces (air, per channel), not 0: a simulated or scanned
    image's air is rarely exactly 0 after scaling and offsets. Cases are named ``<case>_masked``.
    Written afresh each run (a resumed run writes the same files again); files written atomically.

    Raises:
        DatasetError: a case's label map has no foreground (a masked copy would be all background) or
            its grid is not the image's.
    """
    from resunet.io import read_nifti, write_nifti

    root.mkdir(parents=True, exist_ok=True)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    training = []
    for case_id in case_ids:
        case = spec.case(case_id)
        label = read_nifti(case.label)
        fg = np.asarray(label.array) > 0
        if not fg.any():
            raise DatasetError(f"dataset {spec.root}: case {case_id}'s label map {case.label} has no foreground, so "
                               "it has no masked copy; drop the case or set finetune.masked_copies=false")
        images = []
        for k, path in enumerate(case.images):
            image = read_nifti(path)
            x = np.asarray(image.array)
            if x.shape[:3] != fg.shape:
                raise DatasetError(f"dataset {spec.root}: case {case_id}: image {path} has shape {x.shape[:3]} but its "
                                   f"label {case.label} has {fg.shape}; they must share one grid")
            inside = fg.reshape(fg.shape + (1,) * (x.ndim - 3))
            faces = np.concatenate([x[i].reshape(-1, *x.shape[3:]) for i in
                                    (np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1])])
            background = np.median(faces, axis=0).astype(x.dtype)
            name = f"{case_id}_masked" + (f"_{k:04d}" if len(case.images) > 1 else "")
            write_nifti(image.with_array(np.where(inside, x, background)), root / "imagesTr" / f"{name}.nii.gz")
            images.append(f"./imagesTr/{name}.nii.gz")
        write_nifti(label, root / "labelsTr" / f"{case_id}_masked.nii.gz")
        training.append({"image": images[0] if len(images) == 1 else images,
                         "label": f"./labelsTr/{case_id}_masked.nii.gz"})
    meta: dict[str, Any] = {"name": f"{spec.name}_masked", "description": "the training corrections with everything "
                            "outside their label set to the background value (finetune.masked_copies)",
                            "modality": {str(i): c for i, c in enumerate(spec.channels)},
                            "labels": {str(k): v for k, v in spec.labels.items()},
                            "numTraining": len(training), "training": training}
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=1) + "\n")
    return load_dataset(root)
