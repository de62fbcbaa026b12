"""``resunet evaluate --pred DIR --gt DIR --out DIR``: metrics tables, report and an audit-log record."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, InputError
from resunet.evaluation.tolerance import DEFAULT_TOLERANCE_MM
from resunet.io.limits import add_limit_argument, export_limit
from resunet.reports.audit import ENV_VAR, audit_db_path, record_run
from resunet.reports.provenance import collect_provenance, utc_now


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compare predicted masks with reference masks: metrics.csv, summary.csv, metrics.json, report",
        description="Match <case>.nii.gz files of --pred and --gt by name, compute Dice, IoU, precision, "
        "recall, HD95, ASSD, NSD (distances in mm) and volumes (mL) per case and label, and write "
        "metrics.csv, summary.csv, metrics.json and report.html (report.pdf with --format html,pdf) into "
        "--out. Every run is appended to the audit log. Definitions: docs/metrics.md.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label masks <case>.nii.gz")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of reference label masks <case>.nii.gz")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--labels", metavar="L1,L2", help="labels to evaluate (default: every non-zero label found)")
    p.add_argument("--tolerance-mm", default=str(DEFAULT_TOLERANCE_MM), metavar="T",
                   help=f"NSD tolerance in mm (default {DEFAULT_TOLERANCE_MM:g})")  # fmt: skip
    p.add_argument("--predictions", metavar="JSON",
                   help="predictions.json written by `resunet predict`: records the model and label names "
                   "(default: --pred DIR/predictions.json when present)")  # fmt: skip
    p.add_argument("--format", default="html", metavar="html,pdf", help="report formats (default html)")
    p.add_argument("--resample-pred", action="store_true",
                   help="resample predictions on another grid onto the reference grid (nearest neighbour) "
                   "instead of stopping")  # fmt: skip
    p.add_argument("--images", metavar="DIR",
                   help="folder of images <case>.nii.gz or <case>_0000.nii.gz shown under the worst cases "
                   "(default: the input scans that predictions.json names); for DICOM SEG masks, the folder of "
                   "the DICOM studies they refer to")  # fmt: skip
    p.add_argument("--audit-db", metavar="PATH",
                   help=f"audit log SQLite file (default ${ENV_VAR} or ~/.resunet/audit.sqlite)")  # fmt: skip
    p.add_argument("--worst-cases", type=int, default=3, metavar="N",
                   help="worst cases per label shown with a slice image in the report (default 3)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    add_limit_argument(p)
    p.set_defaults(func=run)


def parse_labels(text: str | None) -> list[int] | None:
    """``"1,2"`` -> ``[1, 2]``; ConfigError on anything but positive integers."""
    if text is None:
        return None
    try:
        labels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        labels = []
    if not labels or any(lab <= 0 for lab in labels):
        raise ConfigError(f"--labels {text!r}: give positive integer labels separated by commas, e.g. 1,2")
    return sorted(set(labels))


def parse_tolerance(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"--tolerance-mm {text!r}: give a number of millimetres >= 0, e.g. 2")
    return t


def read_predictions_json(path: str | None) -> dict[str, Any]:
    """The predictions.json document (``{}`` when not given); InputError if unreadable."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        p = p / "predictions.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read --predictions {p}: {err}") from err
    if not isinstance(doc, dict):
        raise InputError(f"--predictions {p}: expected a JSON object written by resunet predict")
    doc["_path"] = str(p)
    return doc


def _label_names(doc: dict[str, Any]) -> dict[int, str]:
    names = doc.get("labels") or (doc.get("model") or {}).get("labels") or {}
    out = {}
    if isinstance(names, dict):
        for k, v in names.items():
            try:
                if int(k) != 0:
                    out[int(k)] = str(v)
            except (TypeError, ValueError):
                continue
    return out


def _input_scans(pred_doc: dict[str, Any], cases: set[str]) -> dict[str, Path]:
    """``{case: input scan}`` from predictions.json for ``cases`` whose scan still exists (a relative path is
    taken from the predictions.json folder first, then the working folder); the report draws the worst
    cases on them when --images does not hold them."""
    base = Path(pred_doc["_path"]).parent if pred_doc.get("_path") else None
    out: dict[str, Path] = {}
    for rec in pred_doc.get("cases") or []:
        if not isinstance(rec, dict) or rec.get("case") not in cases or rec.get("status") not in (None, "ok"):
            continue
        raw = (rec.get("input") or {}).get("path")
        if not raw:
            continue
        p = Path(raw)
        for cand in ([p] if p.is_absolute() else [base / p, p] if base else [p]):
            if cand.exists():
                out[str(rec["case"])] = cand
                break
    return out


def run(args: argparse.Namespace) -> int:
    # here, not at import: the parser (`resunet --help`) stays free of numpy, scipy and matplotlib
    from resunet.evaluation import evaluate_folders
    from resunet.reports.report import find_image, parse_formats, write_evaluation_outputs

    started = utc_now()
    export_limit(args)  # the worker processes read the masks with this limit
    labels = parse_labels(args.labels)
    tolerance = parse_tolerance(args.tolerance_mm)
    formats = parse_formats(args.format)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give 1 or more")
    if args.worst_cases < 0:
        raise ConfigError(f"--worst-cases {args.worst_cases}: give 0 or more")
    if args.images is not None and not Path(args.images).is_dir():
        raise InputError(f"--images {args.images} is not a folder")
    predictions = args.predictions
    if predictions is None and (Path(args.pred) / "predictions.json").is_file():
        predictions = str(Path(args.pred) / "predictions.json")  # written by resunet predict next to the masks
    pred_doc = read_predictions_json(predictions)
    audit_db = audit_db_path(args.audit_db)

    ev = evaluate_folders(args.pred, args.gt, labels, tolerance, args.resample_pred, _label_names(pred_doc),
                          workers=args.workers, images_dir=args.images)  # fmt: skip
    files: dict[str, list] = {
        "prediction": [p for _, p, _ in ev.match.pairs],
        "reference": [g for _, _, g in ev.match.pairs],
    }
    case_images = _input_scans(pred_doc, {c for c, _, _ in ev.match.pairs if find_image(args.images, c) is None})
    images = [i for c, _, _ in ev.match.pairs if (i := find_image(args.images, c)) is not None]
    images += sorted(case_images.values())  # the input scans predictions.json names (shown under the worst cases)
    images += sorted({src for src, _ in ev.match.sources.values()})  # DICOM studies behind SEG masks
    if images:
        files["image"] = images
    if pred_doc:
        files["predictions_summary"] = [pred_doc["_path"]]
    prov = collect_provenance(files=files, started_utc=started)
    pred_prov = pred_doc.get("provenance") or {}
    model = pred_prov.get("model") or pred_doc.get("model")
    if isinstance(model, dict) and model.get("name"):
        prov["model"] = {k: model.get(k) for k in ("name", "path", "sha256", "size_bytes") if k in model}
    if pred_prov.get("run_id"):
        prov["prediction_run_id"] = pred_prov["run_id"]
    evaluated = {c for c, _, _ in ev.match.pairs}
    input_warnings = {rec["case"]: list(rec["warnings"]) for rec in pred_doc.get("cases") or []
                      if isinstance(rec, dict) and rec.get("warnings") and rec.get("case") in evaluated}
    if input_warnings:  # e.g. NaN voxels set to 0 before segmenting: the report must say so beside the numbers
        prov["input_warnings"] = input_warnings

    written = write_evaluation_outputs(ev, prov, args.out, formats, args.images, args.worst_cases,
                                       case_images=case_images)
    record_run("evaluate", prov, list(written.values()), db_path=audit_db)

    _print_summary(ev)
    for c in ev.match.gt_only:
        print(f"NOT EVALUATED: reference {c} has no prediction in {args.pred}")
    for c in ev.match.pred_only:
        print(f"NOT EVALUATED: prediction {c} has no reference in {args.gt}")
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    print(f"audit log: run {prov['run_id']} appended to {audit_db}")
    return 0


def _print_summary(ev) -> None:
    n = len(ev.match.pairs)
    print(f"{n} {'case' if n == 1 else 'cases'}, NSD tolerance {ev.tolerance_mm:g} mm (mean [95% CI]; undefined not averaged)")
    show = ("dice", "hd95", "assd", "nsd")
    for lab in ev.labels:
        rows = {r["metric"]: r for r in ev.summary if r["label"] == lab}
        parts = []
        for m in show:
            r = rows[m]
            if r["mean"] is None:
                parts.append(f"{m} undefined ({r['n_undefined']})")
                continue
            ci = f" [{r['ci95_low']:.4g}, {r['ci95_high']:.4g}]" if r["ci95_low"] is not None else ""
            und = f" ({r['n_undefined']} undefined)" if r["n_undefined"] else ""
            parts.append(f"{m} {r['mean']:.4g}{ci}{und}")
        name = ev.label_names.get(lab, "")
        print(f"  label {lab}{' ' + name if name else ''}: " + ", ".join(parts))
