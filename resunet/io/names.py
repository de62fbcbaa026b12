"""File names made from identifiers: one sanitiser for UIDs, case ids and label names.

DICOM UIDs are digits and dots, but an archive may send anything in a UID field, and label names are
the user's: a character outside letters, digits, ``-`` and ``_`` (and ``.`` where allowed) becomes
``_``, and a name made of dots only (``.``, ``..``) becomes underscores, so a name can never climb
out of its folder or carry a shell-hostile character. Written by hand: a few lines, and no library
offers this rule.
"""

from __future__ import annotations


def safe_name(text: str, fallback: str = "unknown", *, dots: bool = True) -> str:
    """``text`` as one file-name component: every character but letters, digits, ``-``, ``_`` (and
    ``.`` when ``dots``) replaced by ``_``, dots only (``..``) by underscores; ``fallback`` when
    ``text`` is empty.

    ``dots=False`` for a part inside a compound name (``<case>.prob-<label>.nii.gz``), where a dot
    would read as another suffix.
    """
    keep = ".-_" if dots else "-_"
    name = "".join(ch if ch.isalnum() or ch in keep else "_" for ch in str(text)) or fallback
    return "_" * len(name) if set(name) == {"."} else name
