"""What a label IS in DICOM terms, and the colour it is shown in: shared by SEG, SR, RTSTRUCT and the viewer.

A DICOM SEG codes each segment with a category (CID 7150 "Segmentation Property Categories") and
a type (e.g. CID 7151 "Segmentation Property Types", the anatomic structures and substances); a
viewer, a PACS or a registry reads these codes, not the free-text SegmentLabel. So every label
resunet knows gets its specific SNOMED CT concept (from pydicom's code dictionary, with the
context groups it lists):

=============================  =============================  ===============================
label (any case, ``_``/``-``)  category (CID 7150)            type
=============================  =============================  ===============================
brain                          Anatomical Structure 91723000  Brain 12738006 (CID 7151)
CSF, cerebrospinal fluid       Body Substance 91720002        Cerebrospinal Fluid 65216001 (CID 7151)
grey matter, gray matter, GM   Anatomical Structure 91723000  Gray Matter 389081007 (CID 7151)
white matter, WM               Anatomical Structure 91723000  White Matter 389080008 (CID 7151)
=============================  =============================  ===============================

A model card may carry its own codes (``model_card["label_codes"]``: label name -> ``{"category":
[value, scheme, meaning], "type": [value, scheme, meaning]}``), which win over this table. Any other
label: the SNOMED CT concept whose name matches it in pydicom's dictionary, under "Anatomical
Structure"; failing that "Tissue" (85756007) under "Tissue", with the label text as SegmentLabel.

Lesion classes: a model card's ``lesion_labels`` (a list of label names, e.g. ``["tumour",
"metastasis"]``) says which labels are lesions, counted one by one: the SR reports each connected
component of such a label as its own measurement group (:mod:`resunet.io.sr`).

Colours: label value ``v`` (``v >= 1``) is shown in ``LABEL_COLOURS[(v - 1) % 8]``: the RTSTRUCT's
ROIDisplayColor, the SEG's RecommendedDisplayCIELabValue (the same colour converted by highdicom's
``CIELabColor.from_rgb``) and the web viewer's overlay, so a structure looks the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

#: Label colours (RGB 0..255), label 1 first; repeats after the last. Chosen to stand out on grey.
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40),    # red
    (40, 200, 255),   # cyan
    (255, 200, 0),    # amber
    (80, 230, 60),    # green
    (230, 80, 255),   # violet
    (255, 130, 0),    # orange
    (0, 120, 255),    # blue
    (255, 100, 170),  # pink
)


def label_colour(value: int) -> tuple[int, int, int]:
    """RGB colour (0..255) of label value ``value`` (``>= 1``)."""
    return LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)]


@dataclass(frozen=True)
class SegmentCoding:
    """The DICOM coding of one label: segmented property category and type (pydicom ``Code``s)."""

    category: Code
    type: Code


_ANATOMY = codes.SCT.AnatomicalStructure
_KNOWN: dict[str, SegmentCoding] = {
    "brain": SegmentCoding(_ANATOMY, codes.SCT.Brain),
    "csf": SegmentCoding(codes.SCT.BodySubstance, codes.SCT.CerebrospinalFluid),
    "cerebrospinal fluid": SegmentCoding(codes.SCT.BodySubstance, codes.SCT.CerebrospinalFluid),
    "grey matter": SegmentCoding(_ANATOMY, codes.SCT.GrayMatter),
    "gray matter": SegmentCoding(_ANATOMY, codes.SCT.GrayMatter),
    "gm": SegmentCoding(_ANATOMY, codes.SCT.GrayMatter),
    "white matter": SegmentCoding(_ANATOMY, codes.SCT.WhiteMatter),
    "wm": SegmentCoding(_ANATOMY, codes.SCT.WhiteMatter),
}


def _key(label: str) -> str:
    return " ".join(label.replace("_", " ").replace("-", " ").lower().split())


def _code(value: Any, label: str, what: str) -> Code:
    from resunet.errors import ModelError

    try:
        v, scheme, meaning = (str(x) for x in value)
    except (TypeError, ValueError):
        raise ModelError(
            f"model card label_codes[{label!r}][{what!r}] must be [code value, coding scheme, meaning],"
            f" got {value!r}; fix the model card"
        ) from None
    return Code(v, scheme, meaning)


def codes_from_model_card(card: Mapping[str, Any] | None) -> dict[str, SegmentCoding]:
    """Label name -> coding from a model card's ``label_codes`` (empty when it has none).

    Raises:
        ModelError: an entry is not ``{"category": [value, scheme, meaning], "type": [...]}``.
    """
    out: dict[str, SegmentCoding] = {}
    for label, entry in dict((card or {}).get("label_codes") or {}).items():
        if not isinstance(entry, Mapping):
            from resunet.errors import ModelError

            raise ModelError(f"model card label_codes[{label!r}] must be a mapping with category and type; fix the model card")
        out[str(label)] = SegmentCoding(_code(entry.get("category"), label, "category"), _code(entry.get("type"), label, "type"))
    return out


def segment_coding(label: str, overrides: Mapping[str, SegmentCoding] | None = None) -> SegmentCoding:
    """The category and type for a label name (module docstring: model card, table, dictionary, Tissue)."""
    if overrides and label in overrides:
        return overrides[label]
    known = _KNOWN.get(_key(label))
    if known is not None:
        return known
    name = "".join(part.capitalize() for part in _key(label).split())
    try:
        return SegmentCoding(_ANATOMY, getattr(codes.SCT, name))
    except AttributeError:
        return SegmentCoding(codes.SCT.Tissue, codes.SCT.Tissue)


def lesion_labels_from_model_card(card: Mapping[str, Any] | None, labels: Any = None) -> tuple[str, ...]:
    """The label names a model card's ``lesion_labels`` marks as lesion classes (empty when it has none).

    Args:
        card: the model card (``Checkpoint.model_card``, ``LoadedModel.meta["model_card"]``).
        labels: the model's label names (any iterable of str); when given, every lesion label must be one.

    Raises:
        ModelError: ``lesion_labels`` is not a list of label names, or names a label the model does not have.
    """
    from resunet.errors import ModelError

    value = (card or {}).get("lesion_labels")
    if value in (None, [], ()):
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"model card lesion_labels must be a list of label names, got {value!r}; fix the model card")
    if labels is not None:
        known = {str(n) for n in labels}
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ModelError(f"model card lesion_labels names {unknown} but the model's labels are {sorted(known)}; "
                             "fix the model card")
    return tuple(dict.fromkeys(value))
