"""The files the page offers for download, written with the library's writers.

- the mask as NIfTI (:func:`resunet.io.write_mask_nifti`: exactly the input's affine and shape);
- a DICOM SEG for DICOM input (:func:`resunet.io.write_dicom_seg`, referencing the source series);
- for an evaluation against a reference: the per-label metrics CSV (the columns of
  ``resunet evaluate``'s ``metrics.csv``) and the HTML (and PDF when available) report from
  :mod:`resunet.reports`.

Files are written into the session folder, read back as bytes and kept on the result, so
re-rendering the page does not write them again.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from resunet.io.volume import Volume

MIME_NIFTI = "application/gzip"
MIME_DICOM = "application/dicom"
MIME_CSV = "text/csv"
MIME_HTML = "text/html"
MIME_PDF = "application/pdf"


def mask_files(volume: Volume, result: Any, outdir: Path) -> dict[str, tuple[bytes, str]]:
    """``{file name: (bytes, mime)}`` for the mask downloads of ``result`` (cached on it)."""
    if "mask" in result.downloads:
        return result.downloads["mask"]
    from resunet.io import write_mask_nifti

    files: dict[str, tuple[bytes, str]] = {}
    nii = write_mask_nifti(result.mask, outdir / "mask.nii.gz")
    files["mask.nii.gz"] = (Path(nii).read_bytes(), MIME_NIFTI)
    if volume.meta.get("format") == "dicom":
        from resunet.io.seg import write_dicom_seg

        seg = write_dicom_seg(result.mask, volume, outdir / "mask.seg.dcm", labels=_names(result))
        files["mask.seg.dcm"] = (Path(seg).read_bytes(), MIME_DICOM)
    result.downloads["mask"] = files
    return files


def _names(result: Any) -> dict[int, str]:
    return {int(r["label"]): str(r["name"]) for r in result.rows}


def metrics_csv(rows: list[dict[str, Any]], case: str, label_names: dict[int, str]) -> bytes:
    """The rows as ``resunet evaluate``'s ``metrics.csv`` (same columns; undefined = empty cell)."""
    from resunet.evaluation import ROW_COLUMNS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        out = {**r, "case": case, "label_name": label_names.get(int(r["label"]), "")}
        writer.writerow({k: ("" if out.get(k) is None else out.get(k)) for k in ROW_COLUMNS})
    return buf.getvalue().encode("utf-8")


def evaluation_files(rows: list[dict[str, Any]], result: Any, ref_path: Path, outdir: Path) -> dict[str, tuple[bytes, str]]:
    """CSV and report downloads for an evaluation of ``result`` against the reference at ``ref_path``."""
    key = ("eval", str(ref_path), tuple(sorted((int(r["label"]), r.get("dice")) for r in rows)))
    if key in result.downloads:
        return result.downloads[key]
    names = _names(result)
    files: dict[str, tuple[bytes, str]] = {"metrics.csv": (metrics_csv(rows, "study", names), MIME_CSV)}
    files.update(_reports(rows, result, ref_path, outdir, names))
    result.downloads[key] = files
    return files


def _reports(rows: list[dict[str, Any]], result: Any, ref_path: Path, outdir: Path, names: dict[int, str]) -> dict[str, tuple[bytes, str]]:
    """HTML/PDF report through resunet.reports (absent in builds without the reports module)."""
    try:
        from resunet.reports import write_case_report  # type: ignore[attr-defined]
    except ImportError:
        return {}
    out: dict[str, tuple[bytes, str]] = {}
    written = write_case_report(
        rows,
        outdir,
        case="study",
        label_names=names,
        model={"name": result.model_name, "sha256": result.model_sha256},
        input_sha256=result.input_sha256,
        reference=ref_path,
    )
    for p in written:
        p = Path(p)
        mime = {".html": MIME_HTML, ".pdf": MIME_PDF, ".csv": MIME_CSV, ".json": "application/json"}.get(p.suffix)
        if mime and p.name != "metrics.csv":
            out[p.name] = (p.read_bytes(), mime)
    return out
