"""Training datasets: Medical Segmentation Decathlon and nnU-Net v2 raw folders.

Two layouts are recognised from ``DATASET/dataset.json``:

- **MSD**: ``{"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "tumour"},
  "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}``.
  A multi-channel case is one 4D NIfTI (channels along the 4th axis, split here into one
  :class:`Volume` per channel) or, as an extension, a list of 3D files/DICOM folders.
- **nnU-Net v2 raw**: ``{"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1},
  "file_ending": ".nii.gz"}`` with ``imagesTr/CASE_0000.nii.gz`` (one file per channel,
  ``_XXXX`` = channel index) and ``labelsTr/CASE.nii.gz``. Region-based label lists are refused.

An image entry may name a DICOM folder (or .zip); it is read with :func:`resunet.io.load_study`.
Every case is checked when it is read: images and label on the same grid, label values declared in
dataset.json; problems raise :class:`~resunet.errors.DatasetError` naming the case and file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from resunet.errors import DatasetError, ResunetError
from resunet.io.hashing import sha256_path
from resunet.io.loader import load_study
from resunet.io.nifti import is_nifti_path
from resunet.io.volume import Volume

#: Channel names that mean CT (intensity normalisation with dataset-wide foreground statistics).
CT_NAMES = ("ct", "computed tomography")


@dataclass
class Case:
    """One training case.

    Attributes:
        case_id: identifier (file stem / nnU-Net case name).
        images: one path per channel; a single 4D NIfTI for a multi-channel MSD case.
        label: label map path (``None`` for unlabelled cases, which training refuses).
    """

    case_id: str
    images: list[str]
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "images": list(self.images), "label": self.label}


@dataclass
class DatasetSpec:
    """A dataset folder's description.

    Attributes:
        root: the dataset folder.
        layout: ``"msd"`` or ``"nnunet"``.
        name: dataset name from dataset.json.
        channels: input channel names, in order.
        labels: label value -> name (0 = background).
        cases: the training cases, sorted by id.
    """

    root: Path
    layout: str
    name: str
    channels: list[str]
    labels: dict[int, str]
    cases: list[Case] = field(default_factory=list)

    @property
    def modality(self) -> str:
        """``"CT"`` if the first channel is CT, ``"MR"`` for MR-like names, else the channel's name."""
        first = self.channels[0].strip().lower() if self.channels else ""
        if first in CT_NAMES:
            return "CT"
        if first in ("mr", "mri") or re.match(r"^(t1|t2|flair|adc|dwi|pd|swi)", first):
            return "MR"
        return self.channels[0] if self.channels else "unknown"

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"{self.root}: no case named {case_id!r}")

    def fingerprint(self) -> str:
        """SHA-256 over every case's id and the SHA-256 of its files (content, not timestamps)."""
        h = hashlib.sha256()
        h.update(json.dumps({"channels": self.channels, "labels": {str(k): v for k, v in self.labels.items()}},
                            sort_keys=True).encode())
        for c in self.cases:
            h.update(c.case_id.encode() + b"\0")
            for p in [*c.images, c.label or ""]:
                if p:
                    h.update(sha256_path(p).encode())
        return h.hexdigest()


def load_dataset(root: str | os.PathLike[str]) -> DatasetSpec:
    """Read ``root/dataset.json`` and list the cases (files are checked to exist, not yet read).

    Raises:
        DatasetError: no/invalid dataset.json, unknown layout, missing files, no cases.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root} has no dataset.json; expected a Medical Segmentation Decathlon or nnU-Net v2 raw folder")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{meta_path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path} must hold a JSON object")
    if "channel_names" in meta or "file_ending" in meta:
        spec = _nnunet(root, meta)
    elif "training" in meta:
        spec = _msd(root, meta)
    else:
        raise DatasetError(f"{meta_path} has neither a 'training' list (MSD) nor 'channel_names'/'file_ending' "
                           "(nnU-Net v2); cannot tell the layout")
    if not spec.cases:
        raise DatasetError(f"dataset {root} has no training cases")
    if 0 not in spec.labels:
        raise DatasetError(f"{meta_path}: labels must declare 0 (background); got {spec.labels}")
    expected = list(range(len(spec.labels)))
    if sorted(spec.labels) != expected:
        raise DatasetError(f"{meta_path}: label values must be consecutive 0..{len(spec.labels) - 1}; got {sorted(spec.labels)}")
    for c in spec.cases:
        for p in [*c.images, c.label]:
            if p is None:
                raise DatasetError(f"{root}: case {c.case_id} has no label; every training case needs one")
            if not Path(p).exists():
                raise DatasetError(f"{root}: case {c.case_id}: file {p} is missing")
    return spec


def _labels_msd(meta: dict[str, Any], where: Path) -> dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: 'labels' must map label values to names, e.g. {{\"0\": \"background\", \"1\": \"brain\"}}")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DatasetError(f"{where}: MSD 'labels' keys must be integers; got {list(raw)}") from None


def _msd(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    where = root / "dataset.json"
    modality = meta.get("modality") or {"0": "unknown"}
    if not isinstance(modality, dict):
        raise DatasetError(f"{where}: 'modality' must map channel indices to names")
    channels = [str(modality[k]) for k in sorted(modality, key=lambda k: int(k))]
    training = meta.get("training")
    if not isinstance(training, list):
        raise DatasetError(f"{where}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{where}: training[{i}] must be an object with 'image' and 'label'")
        imgs = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [str((root / p).resolve()) for p in imgs]
        label = str((root / entry["label"]).resolve()) if entry.get("label") else None
        if len(imgs) > 1 and len(imgs) != len(channels):
            raise DatasetError(f"{where}: training[{i}] lists {len(imgs)} images but 'modality' names {len(channels)} channels")
        cases.append(Case(case_id=_stem(images[0]), images=images, label=label))
    _check_unique(cases, where)
    return DatasetSpec(root=root, layout="msd", name=str(meta.get("name", root.name)), channels=channels,
                       labels=_labels_msd(meta, where), cases=sorted(cases, key=lambda c: c.case_id))


def _nnunet(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    where = root / "dataset.json"
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{where}: 'channel_names' must map channel indices to names, e.g. {{\"0\": \"T1\"}}")
    channels = [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: 'labels' must map names to values, e.g. {{\"background\": 0, \"brain\": 1}}")
    labels: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{where}: label {name!r} is a region (list of values); region-based training is not supported")
        try:
            labels[int(value)] = str(name)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: label {name!r} must have an integer value; got {value!r}") from None
    ending = str(meta.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: nnU-Net layout needs an imagesTr folder")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[int, str]] = {}
    for p in sorted(images_dir.iterdir()):
        m = pattern.match(p.name)
        if m:
            found.setdefault(m["case"], {})[int(m["ch"])] = str(p.resolve())
    cases = []
    for case_id, chans in sorted(found.items()):
        missing = [i for i in range(len(channels)) if i not in chans]
        if missing:
            raise DatasetError(f"{images_dir}: case {case_id} lacks channel file(s) "
                               + ", ".join(f"{case_id}_{i:04d}{ending}" for i in missing))
        label = labels_dir / f"{case_id}{ending}"
        cases.append(Case(case_id=case_id, images=[chans[i] for i in range(len(channels))], label=str(label.resolve())))
    return DatasetSpec(root=root, layout="nnunet", name=str(meta.get("name", root.name)), channels=channels,
                       labels=labels, cases=cases)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_unique(cases: list[Case], where: Path) -> None:
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(f"{where}: two training cases are named {c.case_id!r}")
        seen.add(c.case_id)


def _read(path: str, case_id: str) -> Volume:
    try:
        return load_study(path)
    except ResunetError as err:
        raise DatasetError(f"case {case_id}: {err}") from None


def _read_channels(path: str, n_channels: int, case_id: str) -> list[Volume]:
    """A 4D NIfTI with channels on the 4th axis -> one Volume per channel (MSD's multi-modal cases)."""
    img = nib.load(path)
    if len(img.shape) != 4 or img.shape[3] != n_channels:
        raise DatasetError(f"case {case_id}: {path} has shape {img.shape}; dataset.json declares {n_channels} channels "
                           "(expected a 4D image with one volume per channel)")
    data = np.asarray(img.dataobj, dtype=np.float32)
    return [Volume(np.ascontiguousarray(data[..., c]), img.affine, {"source": f"{path}[{c}]", "format": "nifti"})
            for c in range(n_channels)]


def read_case(spec: DatasetSpec, case: Case) -> tuple[list[Volume], Volume]:
    """Read one case's channels and label, and check them.

    Returns:
        ``(images, label)``: one Volume per channel and the label Volume (integer values).

    Raises:
        DatasetError: unreadable file, wrong channel count, image/label shape or geometry mismatch,
            label values not declared in dataset.json.
    """
    n = len(spec.channels)
    if len(case.images) == 1 and n > 1:
        if not is_nifti_path(case.images[0]):
            raise DatasetError(f"case {case.case_id}: {n} channels need a 4D NIfTI or one image per channel")
        images = _read_channels(case.images[0], n, case.case_id)
    else:
        images = [_read(p, case.case_id) for p in case.images]
    assert case.label is not None
    label = _read(case.label, case.case_id)
    ref = images[0]
    for v in images[1:]:
        if not ref.same_grid(v, atol=1e-3):
            raise DatasetError(f"case {case.case_id}: channels are on different grids ({ref.describe_grid()} vs "
                               f"{v.describe_grid()}); resample them onto one grid")
    if label.shape != ref.shape:
        raise DatasetError(f"case {case.case_id}: label {case.label} has shape {label.shape} but the image has "
                           f"{ref.shape}; image and label must be on the same voxel grid")
    if not np.allclose(label.affine, ref.affine, atol=1e-3):
        raise DatasetError(f"case {case.case_id}: label {case.label} has different geometry than its image "
                           f"(label {label.describe_grid()}; image {ref.describe_grid()}); fix the label's header")
    values = np.unique(np.asarray(label.array))
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise DatasetError(f"case {case.case_id}: label {case.label} holds non-integer values; labels must be integers")
    undeclared = sorted(set(int(v) for v in values) - set(spec.labels))
    if undeclared:
        raise DatasetError(f"case {case.case_id}: label {case.label} holds value(s) {undeclared} not declared in "
                           f"dataset.json labels {sorted(spec.labels)}")
    label = label.with_array(np.asarray(label.array).astype(np.int16 if values.max() > 255 else np.uint8), is_label=True)
    return images, label
