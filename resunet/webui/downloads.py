"""The files the page offers for download, written with the library's writers.

- the mask as NIfTI (:func:`resunet.io.write_mask_nifti`: exactly the input's affine and shape);
- a DICOM SEG for DICOM input (:func:`resunet.io.write_dicom_seg`, referencing the source series);
- an RTSTRUCT for DICOM input (:func:`resunet.io.write_rtstruct`: contours per label and slice);
- for an evaluation against a reference: exactly what ``resunet evaluate`` writes (metrics.csv,
  summary.csv, report.html, report.pdf, metrics.json), made by the same library functions.

Files are written into the session folder, read back as bytes and kept on the result, so
re-rendering the page does not write them again.
"""

from __future__ import annotations

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

        algorithm = f"resunet {result.model_name}"[:64]
        seg = write_dicom_seg(result.mask, volume, outdir / "mask.seg.dcm", labels=_names(result),
                              algorithm_name=algorithm, model_sha256=result.model_sha256)
        files["mask.seg.dcm"] = (Path(seg).read_bytes(), MIME_DICOM)
        from resunet.io.rtstruct import write_rtstruct

        rts = write_rtstruct(result.mask, volume, outdir / "mask.rtstruct.dcm", labels=_names(result),
                             algorithm_name=algorithm, model_sha256=result.model_sha256)
        files["mask.rtstruct.dcm"] = (Path(rts).read_bytes(), MIME_DICOM)
    result.downloads["mask"] = files
    return files


def _names(result: Any) -> dict[int, str]:
    return {int(r["label"]): str(r["name"]) for r in result.rows}


def evaluation_outputs(
    result: Any,
    volume: Volume,
    ref_path: Path,
    workdir: Path,
    *,
    model_path: Path | None,
    tolerance_mm: float,
    resample_pred: bool = False,
    formats: tuple[str, ...] = ("html", "pdf"),
    web_user: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, tuple[bytes, str]]]:
    """Evaluate the prediction against a reference exactly as ``resunet evaluate`` does, and its files.

    The mask, the reference and the image are written as one case (``study``) into folders under
    ``workdir`` and passed to :func:`resunet.evaluation.evaluate_folders` and
    :func:`resunet.reports.write_evaluation_outputs`: the same functions, so the same numbers and the
    same report, as the command line.

    Returns:
        ``(rows, files)``: the metrics rows (one per label; ``None`` = undefined) and
        ``{file name: (bytes, mime)}`` for metrics.csv, summary.csv, report.html, report.pdf, metrics.json.
    """
    import shutil

    from resunet.evaluation import evaluate_folders
    from resunet.io import write_mask_nifti, write_nifti
    from resunet.reports import collect_provenance, write_evaluation_outputs

    suffix = ".nii" if ref_path.name.endswith(".nii") else ".nii.gz"
    dirs = {name: workdir / name for name in ("pred", "gt", "images", "report")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    pred = write_mask_nifti(result.mask, dirs["pred"] / "study.nii.gz")
    ref = dirs["gt"] / f"study{suffix}"
    shutil.copyfile(ref_path, ref)
    image = write_nifti(volume, dirs["images"] / "study.nii.gz")
    names = _names(result)
    ev = evaluate_folders(dirs["pred"], dirs["gt"], tolerance_mm=tolerance_mm, resample_pred=resample_pred,
                          label_names=names, workers=1)
    prov = collect_provenance(
        command=["resunet", "app"],
        files={"prediction": [pred], "reference": [ref], "image": [image]},
        model_path=model_path,
        model_name=result.model_name,
    )
    if web_user:
        prov["web_user"] = web_user  # the signed-in user of the page (report and metrics.json)
    written = write_evaluation_outputs(ev, prov, dirs["report"], formats=formats, images_dir=dirs["images"])
    mimes = {".csv": MIME_CSV, ".html": MIME_HTML, ".pdf": MIME_PDF, ".json": "application/json"}
    files = {}
    for key in ("metrics_csv", "summary_csv", "html", "pdf", "metrics_json"):
        if key in written:
            p = Path(written[key])
            files[p.name] = (p.read_bytes(), mimes.get(p.suffix, "application/octet-stream"))
    return ev.rows, files
