"""The one statement of every metric definition and convention.

The HTML/PDF report prints :data:`DEFINITIONS` and ``docs/metrics.md`` is generated from it
(``python -m resunet.evaluation.definitions > docs/metrics.md``; a test checks that the file is up to
date), so the text an auditor reads is the text the code was tested against.
"""

from __future__ import annotations

import sys

from resunet.evaluation.metrics import DEFAULT_TOLERANCE_MM
from resunet.evaluation.runner import ROW_COLUMNS
from resunet.evaluation.summary import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SUMMARY_COLUMNS

TITLE = "Metric definitions and conventions"

#: Each metric's meaning in one line, for a reader beside the numbers (the web page's metrics table);
#: the exact definitions are DEFINITIONS below. ``{t}`` is the NSD tolerance in mm.
IN_ONE_LINE: dict[str, str] = {
    "dice": "overlap of the two masks, 0 to 1 (1 = identical)",
    "iou": "intersection over union, 0 to 1 (1 = identical)",
    "precision": "share of the predicted voxels that are in the reference",
    "recall": "share of the reference voxels that were predicted (sensitivity)",
    "hd95": "95th-percentile distance between the two outlines, mm: how far the worst parts stray (lower is better)",
    "assd": "average distance between the two outlines, mm (lower is better)",
    "nsd": "share of both outlines lying within {t} mm of the other, 0 to 1 (1 = everywhere within {t} mm)",
}

#: (section title, [(term, definition), ...]); plain text with `code` in backticks.
DEFINITIONS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Masks and labels",
        [
            ("Label mask", "For label l, P is the set of prediction voxels equal to l and R the set of reference "
             "(ground truth) voxels equal to l. Background is 0. Prediction and reference must be on the same voxel "
             "grid (same shape and voxel-to-world affine within 1e-4 mm); otherwise the evaluation stops with an "
             "error naming both geometries, unless `--resample-pred` is given, which resamples the prediction onto "
             "the reference grid with nearest-neighbour interpolation (and warns). A mask must hold whole numbers: "
             "non-integer values, negative values and NaN/infinite voxels are refused with the file and the count named. "
             "A NIfTI file without the label intent that holds more than 100 distinct values looks like a scan, not "
             "a label map, and is refused unless `--labels` names the labels to score."),
            ("Labels evaluated", "The labels given with `--labels`; by default every non-zero value found in any "
             "prediction or reference. A label absent from both masks of a case counts as both empty for that case."),
            ("Case matching", "A case is a file `<case>.nii.gz` (or `.nii`) present in both the prediction and the "
             "reference folder. A DICOM SEG (`<case>.seg.dcm`, or any `.dcm` of Modality SEG) is matched with the "
             "reference of the same case name, else with a reference SEG that refers to the same image series; it "
             "is read onto the grid of that series, found in `--images`. Files present in only one folder are "
             "listed as unmatched in every output and are not evaluated. `resunet predict`'s probability and "
             "uncertainty maps (`<case>.prob*.nii.gz`, `<case>.uncertainty.nii.gz`) are not cases."),
        ],
    ),
    (
        "Overlap (on the voxel grid)",
        [
            ("dice", "2|P∩R| / (|P|+|R|), voxel counts."),
            ("iou", "|P∩R| / |P∪R| (Jaccard index)."),
            ("precision", "TP/(TP+FP) = |P∩R| / |P|."),
            ("recall", "TP/(TP+FN) = |P∩R| / |R| (sensitivity)."),
        ],
    ),
    (
        "Surface distances (mm)",
        [
            ("Boundary voxels", "A mask voxel with at least one of its 6 face neighbours (4 in 2D) outside the mask "
             "or outside the image: `mask AND NOT binary_erosion(mask)` with a cross-shaped structuring element and "
             "zero border. This is MONAI's `get_mask_edges` without sub-voxels. 2D images stored with one slice "
             "(K = 1) use in-plane boundaries."),
            ("Distance", "Euclidean distance in mm between voxel centres, with the voxel spacing taken from the "
             "affine (anisotropic spacing honoured; never voxel units; grids with non-orthogonal voxel axes are refused). d(P→R) is the list of distances from each "
             "boundary voxel of P to the nearest boundary voxel of R, and d(R→P) the other way round."),
            ("hd95", "max(p95(d(P→R)), p95(d(R→P))): the larger of the two directed 95th percentiles, percentile "
             "with linear interpolation between order statistics (numpy and torch default)."),
            ("assd", "Average symmetric surface distance: the mean of all values of d(P→R) and d(R→P) together "
             "(each boundary voxel counts once)."),
            ("nsd", "Normalised surface Dice at tolerance T mm (default "
             f"{DEFAULT_TOLERANCE_MM:g} mm, `--tolerance-mm`): (#{{d(P→R) ≤ T}} + #{{d(R→P) ≤ T}}) / "
             "(|boundary of P| + |boundary of R|), counting boundary voxels (not sub-voxel areas)."),
            ("Agreement with MONAI", "hd95, assd and nsd equal MONAI's `compute_hausdorff_distance(percentile=95)`, "
             "`compute_average_surface_distance(symmetric=True)` and `compute_surface_dice(class_thresholds=[T])` "
             "called with the same `spacing` (default `distance_metric=\"euclidean\"`, `use_subvoxels=False`) to "
             "within 1e-3 relative; the test suite checks this on random shapes with anisotropic spacing."),
        ],
    ),
    (
        "Volumes (mL)",
        [
            ("vol_pred_ml, vol_gt_ml", "Voxel count × voxel volume (|det| of the affine's 3x3 part, mm³) / 1000."),
            ("vol_diff_ml", "vol_pred_ml − vol_gt_ml (positive = over-segmentation)."),
            ("Bland-Altman", "Difference (prediction − reference) against the mean of the two volumes; the bias is "
             "the mean difference and the limits of agreement are bias ± 1.96 × sample standard deviation."),
        ],
    ),
    (
        "Empty masks",
        [
            ("both_empty", "Neither mask contains the label: dice = iou = precision = recall = nsd = 1, "
             "hd95 = assd = 0."),
            ("ref_empty", "Reference empty, prediction not: dice = iou = precision = 0, recall undefined, hd95 and "
             "assd undefined, nsd = 0 (no predicted boundary lies within T of a reference boundary)."),
            ("pred_empty", "Prediction empty, reference not: dice = iou = recall = 0, precision undefined, hd95 and "
             "assd undefined, nsd = 0."),
            ("both_present", "Both masks contain the label: every metric is defined by the formulas above."),
            ("Undefined values", "Written as an empty cell in CSV and `null` in JSON, counted per label and metric in "
             "the summary (`n_undefined`), and left out of every summary statistic: never averaged as zero."),
        ],
    ),
    (
        "Summary statistics (per label and metric, over the cases where the value is defined)",
        [
            ("mean, std", "Arithmetic mean; sample standard deviation (n − 1 in the denominator), empty when fewer "
             "than 2 values."),
            ("median, q1, q3, iqr", "Percentiles 50, 25 and 75 with linear interpolation; iqr = q3 − q1."),
            ("ci95_low, ci95_high", f"95% percentile bootstrap confidence interval of the mean: {BOOTSTRAP_RESAMPLES} "
             f"resamples of the cases with replacement, numpy `default_rng({BOOTSTRAP_SEED})`, the 2.5th and 97.5th "
             "percentiles of the resampled means; empty when fewer than 2 values."),
            ("Counts", "n_cases (cases evaluated), n_defined and n_undefined for the metric, and the number of cases "
             "in each empty-mask situation (n_both_present, n_both_empty, n_ref_empty, n_pred_empty)."),
        ],
    ),
    (
        "Output files (in --out)",
        [
            ("metrics.csv", "One row per case and label; columns " + ", ".join(f"`{c}`" for c in ROW_COLUMNS)
             + ". `situation` is the empty-mask situation; `n_pred`, `n_gt`, `tp` are voxel counts. Floats are "
             "written with full precision; undefined values are empty cells."),
            ("summary.csv", "One row per label and metric; columns " + ", ".join(f"`{c}`" for c in SUMMARY_COLUMNS)
             + "."),
            ("metrics.json", "The same rows and summary (undefined = null), the unmatched and resampled cases, "
             "these conventions, the provenance, and the SHA-256 of every other output file."),
            ("report.html / report.pdf", "Tables, per-label plots, the worst cases with a slice image, these "
             "definitions and the provenance; the HTML file is self-contained (inline CSS and images, no "
             "external links). A worst-case slice shows the case's scan (from `--images`, else the input "
             "that predictions.json names) in the web page's convention: on the patient axes, the patient's "
             "right on the left, R/L, A/P, S/I letters at the edges."),
        ],
    ),
    (
        "Provenance and audit",
        [
            ("Provenance", "Each report records the resunet, Python, torch, MONAI, numpy and scipy versions, the "
             "model name and SHA-256 (when known), the SHA-256 and size of every prediction, reference and image "
             "file, the full command, the user, the host and UTC start and end times."),
            ("Audit log", "Every evaluate (and predict) run appends one record to an SQLite audit log "
             "(`~/.resunet/audit.sqlite`, or `RESUNET_AUDIT_DB`, or `--audit-db`). The table refuses updates and "
             "deletes, and each record holds the SHA-256 of the previous record and its own content, so an edit "
             "made with another tool shows in `resunet audit log`."),
            ("audit verify", "`resunet audit verify DIR` recomputes the SHA-256 of every file listed with a hash in "
             "DIR's metrics.json / predictions.json and names each changed or missing file (exit code 1 if any)."),
        ],
    ),
]


def to_markdown() -> str:
    """The definitions as Markdown (the content of ``docs/metrics.md``)."""
    lines = [
        f"# {TITLE}",
        "",
        "<!-- Generated by `python -m resunet.evaluation.definitions > docs/metrics.md` from",
        "     resunet/evaluation/definitions.py; edit that file, not this one. -->",
        "",
        "The same text is printed in every HTML/PDF evaluation report.",
    ]
    for section, items in DEFINITIONS:
        lines += ["", f"## {section}", ""]
        for term, text in items:
            lines.append(f"- **{term}**: {text}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - generator entry point
    sys.stdout.write(to_markdown())
