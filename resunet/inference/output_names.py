"""Names for result files handed to a user (download names), so that none can be taken for the scan.

On disk the batch runner names a case's mask ``<case>.nii.gz`` (``resunet evaluate`` matches cases by
that name). Downloaded next to the input (``curl -OJ``, a browser's download folder) that name is the
scan's own name (``colin27_t1.nii.gz``): curl refuses to overwrite it (exit 23) and a person can open the
wrong file. A download name says what the file is: ``<case>_mask.nii.gz``, ``<case>_seg.dcm``,
``<case>_rtstruct.dcm``, ``<case>_sr.dcm``, ``<case>_prob.nii.gz``, ``<case>_uncertainty.nii.gz``.
"""

from __future__ import annotations

#: Output key (as in predictions.json ``outputs``) -> (suffix on disk after the case id, download suffix).
_KINDS: dict[str, tuple[str, str]] = {
    "mask": (".nii.gz", "_mask.nii.gz"),
    "seg": (".seg.dcm", "_seg.dcm"),
    "rtstruct": (".rtstruct.dcm", "_rtstruct.dcm"),
    "sr": (".sr.dcm", "_sr.dcm"),
    "probabilities": (".prob.nii.gz", "_prob.nii.gz"),
    "uncertainty": (".uncertainty.nii.gz", "_uncertainty.nii.gz"),
    "disagreement": (".uncertainty-models.nii.gz", "_uncertainty-models.nii.gz"),
}


def download_name(key: str, file_name: str) -> str:
    """The name to offer a result file under.

    Args:
        key: the output's key (``mask``, ``seg``, ``probabilities:brain``, ``predictions``, ...).
        file_name: its name on disk (``colin27_t1.nii.gz``).

    Returns:
        ``colin27_t1_mask.nii.gz`` for the mask, ``colin27_t1_prob-brain.nii.gz`` for a per-label
        probability map; names of other files (``predictions.json``) unchanged.
    """
    if key.startswith("probabilities:"):
        marker = ".prob-"
        at = file_name.rfind(marker)
        if at > 0 and file_name.endswith(".nii.gz"):
            return file_name[:at] + "_prob-" + file_name[at + len(marker):]
        return file_name
    kind = _KINDS.get(key)
    if kind is None:
        return file_name
    disk_suffix, download_suffix = kind
    if file_name.endswith(disk_suffix) and len(file_name) > len(disk_suffix):
        return file_name[: -len(disk_suffix)] + download_suffix
    return file_name
