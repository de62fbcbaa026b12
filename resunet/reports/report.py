"""Writing an evaluation's outputs: metrics.csv, summary.csv, report.html / report.pdf, metrics.json.

:func:`write_evaluation_outputs` is what ``resunet evaluate`` calls; :func:`render_report` renders only
the HTML/PDF report, for use from Python.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, InputError
from resunet.evaluation.cases import read_mask, read_pair
from resunet.evaluation.definitions import DEFINITIONS, TITLE as DEFINITIONS_TITLE
from resunet.evaluation.metrics import resample_nearest
from resunet.evaluation.runner import Evaluation
from resunet.io.atomic import atomic_path, atomic_write_text
from resunet.io.volume import Volume
from resunet.reports import figures
from resunet.reports.html import build_html
from resunet.reports.provenance import file_record
from resunet.reports.tables import metrics_document, write_json, write_metrics_csv, write_summary_csv

log = logging.getLogger(__name__)

FORMATS = ("html", "pdf")
IMAGE_NAME_PATTERNS = ("{case}.nii.gz", "{case}_0000.nii.gz", "{case}.nii", "{case}_0000.nii")


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"html,pdf"`` -> ``("html", "pdf")``; ConfigError on an unknown format."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise ConfigError(f"report format {','.join(bad) or repr(text)} not supported; choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def find_image(images_dir: str | os.PathLike[str] | None, case: str) -> Path | None:
    """The image of ``case`` in ``images_dir`` (``<case>.nii.gz`` or nnU-Net's ``<case>_0000.nii.gz``)."""
    if images_dir is None:
        return None
    for pat in IMAGE_NAME_PATTERNS:
        p = Path(images_dir) / pat.format(case=case)
        if p.is_file():
            return p
    return None


def worst_cases(evaluation: Evaluation, per_label: int = 3) -> list[dict[str, Any]]:
    """Rows with the lowest Dice per label (ties: larger HD95 first), skipping both-empty rows."""
    out = []
    for lab in evaluation.labels:
        rows = [r for r in evaluation.rows if r["label"] == lab and r["situation"] != "both_empty"]
        rows.sort(key=lambda r: (r["dice"], -(r["hd95"] if r["hd95"] is not None else float("inf"))))
        out.extend(rows[:per_label])
    return out


def cases_word(n: int) -> str:
    """``"1 case"``, ``"3 cases"``."""
    return f"{n} case" if n == 1 else f"{n} cases"


def _case_volumes(
    evaluation: Evaluation, case: str, images_dir, case_images: Mapping[str, Path] | None = None
) -> tuple[Volume, Volume, Volume | None, str]:
    paths = {c: (p, g) for c, p, g in evaluation.match.pairs}
    p_path, g_path = paths[case]
    pred, ref, image = read_pair(p_path, g_path, evaluation.match.sources.get(case), evaluation.label_names)
    note = ""
    if not pred.same_grid(ref):
        pred = resample_nearest(pred, ref)
    img_path = find_image(images_dir, case) if image is None else None
    from_predictions = False
    if img_path is None and image is None and case_images and case_images.get(case) is not None:
        img_path, from_predictions = Path(case_images[case]), True  # the input scan named in predictions.json
    if img_path is not None:
        try:
            if from_predictions:
                from resunet.io.loader import load_study

                image = load_study(img_path)  # NIfTI, DICOM folder or zip: whatever predict read
            else:
                image = read_mask(img_path)
        except InputError as err:
            log.warning("case %s: image %s not shown: %s", case, img_path, err)
            note = f" (image {img_path.name} unreadable)"
        if image is not None and not image.same_grid(ref):
            image = resample_nearest(image, ref)
            note = " (image resampled onto the reference grid, nearest neighbour)"
    return pred, ref, image, note


def render_report(
    evaluation: Evaluation,
    provenance: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("html",),
    images_dir: str | os.PathLike[str] | None = None,
    worst_per_label: int = 3,
    title: str = "resunet evaluation report",
    case_images: Mapping[str, Path] | None = None,
) -> dict[str, Path]:
    """Write ``report.html`` and/or ``report.pdf`` into ``out_dir`` (atomically) and return their paths.

    Args:
        evaluation: from :func:`resunet.evaluation.evaluate_folders`.
        provenance: from :func:`resunet.reports.provenance.collect_provenance`.
        out_dir: output folder (created).
        formats: any of ``"html"``, ``"pdf"``.
        images_dir: optional folder with the images (``<case>.nii.gz`` or ``<case>_0000.nii.gz``) shown
            under the worst cases' masks.
        worst_per_label: how many worst cases to show per label.
        title: report title.
        case_images: ``{case: input scan}`` (from predictions.json), shown when ``images_dir`` has none.
    """
    formats = parse_formats(formats)
    out = Path(out_dir)
    label_plots = []
    for lab in evaluation.labels:
        rows = [r for r in evaluation.rows if r["label"] == lab]
        fig = figures.label_figure(rows, lab, evaluation.label_names.get(lab, ""))
        label_plots.append((lab, fig))
    worst = []
    cache: dict[str, tuple] = {}
    for row in worst_cases(evaluation, worst_per_label):
        case = row["case"]
        if case not in cache:
            cache = {case: _case_volumes(evaluation, case, images_dir, case_images)}  # keep one case in memory
        pred, ref, image, note = cache[case]
        fig = figures.case_slice_figure(case, row["label"], pred, ref, image, row)
        caption = f"case {case}, label {row['label']}: Dice {row['dice']:.4g}, HD95 " + (
            f"{row['hd95']:.4g} mm" if row["hd95"] is not None else "undefined"
        ) + f" ({row['situation'].replace('_', ' ')}){note}"
        worst.append((caption, fig))
    written: dict[str, Path] = {}
    if "html" in formats:
        text = build_html(
            evaluation,
            provenance,
            [(lab, figures.figure_png_base64(f)) for lab, f in label_plots],
            [(c, figures.figure_png_base64(f)) for c, f in worst],
            title=title,
        )
        atomic_write_text(out / "report.html", text)
        written["html"] = out / "report.html"
    if "pdf" in formats:
        written["pdf"] = _write_pdf(out / "report.pdf", evaluation, provenance, label_plots, worst, title)
    return written


def _text_pages(lines: list[str], title: str) -> list[Any]:
    """Figures with monospace text, ~60 lines per A4 page."""
    from matplotlib.figure import Figure

    pages = []
    per_page = 62
    for start in range(0, max(len(lines), 1), per_page):
        fig = Figure(figsize=(8.27, 11.69))
        fig.text(0.06, 0.97, title, fontsize=12, weight="bold", va="top")
        fig.text(0.06, 0.94, "\n".join(lines[start : start + per_page]), fontsize=7, family="monospace", va="top")
        pages.append(fig)
    return pages


def _write_pdf(path: Path, ev: Evaluation, prov: Mapping[str, Any], label_plots, worst, title: str) -> Path:
    from matplotlib.backends.backend_pdf import PdfPages

    wrap = lambda s, ind="": textwrap.wrap(s, 110, initial_indent=ind, subsequent_indent=ind + "  ") or [""]  # noqa: E731
    head = [
        f"{cases_word(len(ev.match.pairs))}, labels {', '.join(map(str, ev.labels))}, NSD tolerance {ev.tolerance_mm:g} mm",
        f"run {prov.get('run_id')}  finished {prov.get('finished_utc')}",
        f"model: {(prov.get('model') or {}).get('name', 'not recorded')}  sha256 {(prov.get('model') or {}).get('sha256')}",
        "undefined values: '-' (never averaged)",
    ]
    if ev.match.gt_only:
        head += wrap(f"NOT EVALUATED, reference without prediction: {', '.join(ev.match.gt_only)}")
    if ev.match.pred_only:
        head += wrap(f"NOT EVALUATED, prediction without reference: {', '.join(ev.match.pred_only)}")
    for case, msgs in sorted((prov.get("input_warnings") or {}).items()):
        for m in msgs:
            head += wrap(f"INPUT WARNING, case {case}: {m}")
    head.append("")
    f = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    for lab in ev.labels:
        rows = [r for r in ev.summary if r["label"] == lab]
        if not rows:
            continue
        c = rows[0]
        head.append(f"label {lab} {ev.label_names.get(lab, '')}: both present {c['n_both_present']}, both empty "
                    f"{c['n_both_empty']}, ref empty {c['n_ref_empty']}, pred empty {c['n_pred_empty']}")  # fmt: skip
        head.append(f"  {'metric':<12}{'n':>5}{'undef':>6}{'mean':>11}{'std':>11}{'median':>11}{'IQR':>11}  95% CI")
        for r in rows:
            ci = "-" if r["ci95_low"] is None else f"{f(r['ci95_low'])} - {f(r['ci95_high'])}"
            head.append(f"  {r['metric']:<12}{r['n_defined']:>5}{r['n_undefined']:>6}{f(r['mean']):>11}"
                        f"{f(r['std']):>11}{f(r['median']):>11}{f(r['iqr']):>11}  {ci}")  # fmt: skip
        head.append("")
    defs = []
    for section, items in DEFINITIONS:
        defs += ["", section.upper()]
        for term, text in items:
            defs += wrap(f"{term}: {text.replace('`', '')}", "- ")
    provl = [f"{k}: {prov.get(k)}" for k in ("run_id", "command_line", "cwd", "user", "host", "started_utc", "finished_utc")]
    provl += [f"{k}: {v}" for k, v in (prov.get("software") or {}).items()]
    for role, recs in (prov.get("files") or {}).items():
        for rec in recs:
            provl += wrap(f"{role}: {rec.get('sha256')}  {rec.get('path')}")
    with atomic_path(path) as tmp, PdfPages(tmp) as pdf:
        for fig in _text_pages(head, title):
            pdf.savefig(fig)
        for _, fig in label_plots:
            pdf.savefig(fig)
        for _, fig in worst:
            pdf.savefig(fig)
        for fig in _text_pages(defs, DEFINITIONS_TITLE):
            pdf.savefig(fig)
        for fig in _text_pages(provl, "Provenance"):
            pdf.savefig(fig)
    return path


def write_evaluation_outputs(
    evaluation: Evaluation,
    provenance: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("html",),
    images_dir: str | os.PathLike[str] | None = None,
    worst_per_label: int = 3,
    case_images: Mapping[str, Path] | None = None,
) -> dict[str, Path]:
    """Write metrics.csv, summary.csv, the report(s) and, last, metrics.json listing the others' hashes.

    ``case_images``: ``{case: input scan}`` for the worst cases' slices (see :func:`render_report`).

    Returns ``{"metrics_csv": ..., "summary_csv": ..., "html": ..., "pdf": ..., "metrics_json": ...}``
    (only the written ones).
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err}") from err
    written = {
        "metrics_csv": write_metrics_csv(evaluation.rows, out / "metrics.csv"),
        "summary_csv": write_summary_csv(evaluation.summary, out / "summary.csv"),
    }
    written.update(render_report(evaluation, provenance, out, formats, images_dir, worst_per_label,
                                 case_images=case_images))
    for fmt in FORMATS:
        stale = out / f"report.{fmt}"
        if fmt not in written and stale.exists():
            log.warning("%s is from an earlier run (not rewritten now, not listed in metrics.json)", stale)
    outputs = []
    for p in written.values():
        rec = file_record(p)
        rec["path"] = p.name  # relative to the report folder, so the folder can be moved
        outputs.append(rec)
    written["metrics_json"] = write_json(metrics_document(evaluation, provenance, outputs), out / "metrics.json")
    return written
