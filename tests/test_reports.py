"""Report outputs: CSV/JSON with undefined values, self-contained HTML with its sections, PDF, provenance."""

from __future__ import annotations

import csv
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from resunet.evaluation import evaluate_folders
from resunet.evaluation.definitions import DEFINITIONS, to_markdown
from resunet.reports import collect_provenance
from resunet.reports.html import SECTIONS
from resunet.reports.report import write_evaluation_outputs

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _save(arr, path):
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for d in ("pred", "gt", "img"):
        (root / d).mkdir()
    for c in range(3):
        gt = np.zeros((24, 24, 8), np.uint8)
        gt[6:18, 6:16, 2:6] = 1
        gt[8:11, 8:11, 3:5] = 2
        pred = np.roll(gt, c, axis=0)
        if c == 2:
            pred[pred == 2] = 0  # label 2 missed: precision, hd95, assd undefined
        _save(gt, root / "gt" / f"case{c}.nii.gz")
        _save(pred, root / "pred" / f"case{c}.nii.gz")
        img = (gt * 100 + np.random.default_rng(c).normal(0, 10, gt.shape)).astype(np.float32)
        _save(img, root / "img" / f"case{c}_0000.nii.gz")
    _save(gt, root / "gt" / "lonely.nii.gz")  # reference without prediction
    ev = evaluate_folders(root / "pred", root / "gt", workers=1)
    prov = collect_provenance(
        command=["resunet", "evaluate", "--pred", str(root / "pred")],
        files={"prediction": [p for _, p, _ in ev.match.pairs], "reference": [g for _, _, g in ev.match.pairs]},
    )
    out = root / "out"
    written = write_evaluation_outputs(ev, prov, out, formats=("html", "pdf"), images_dir=root / "img", worst_per_label=1)
    return out, written, ev


def test_metrics_csv_has_rows_and_empty_cells_for_undefined(report_dir):
    out, _, ev = report_dir
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = "case,label,dice,iou,precision,recall,hd95,assd,nsd,vol_pred_ml,vol_gt_ml,vol_diff_ml".split(",")
    assert all(c in rows[0] for c in need)
    assert len(rows) == 6  # 3 cases x 2 labels; 'lonely' is not evaluated
    missed = next(r for r in rows if r["case"] == "case2" and r["label"] == "2")
    assert missed["situation"] == "pred_empty"
    assert missed["precision"] == "" and missed["hd95"] == "" and missed["assd"] == ""
    assert float(missed["dice"]) == 0.0 and float(missed["recall"]) == 0.0
    exact = next(r for r in rows if r["case"] == "case0" and r["label"] == "1")
    assert float(exact["dice"]) == 1.0 and float(exact["hd95"]) == 0.0
    # full precision floats round-trip exactly
    assert float(exact["vol_gt_ml"]) == ev.rows[0]["vol_gt_ml"]


def test_summary_csv_counts_situations(report_dir):
    out, _, _ = report_dir
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    hd = next(r for r in rows if r["label"] == "2" and r["metric"] == "hd95")
    assert (hd["n_cases"], hd["n_defined"], hd["n_undefined"], hd["n_pred_empty"]) == ("3", "2", "1", "1")
    for col in ("mean", "std", "median", "iqr", "ci95_low", "ci95_high"):
        assert hd[col] != ""


def test_metrics_json_nulls_unmatched_provenance_outputs(report_dir):
    out, _, _ = report_dir
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["unmatched"] == {"pred_only": [], "gt_only": ["lonely"]}
    row = next(r for r in doc["rows"] if r["case"] == "case2" and r["label"] == 2)
    assert row["hd95"] is None and row["precision"] is None
    prov = doc["provenance"]
    for key in ("run_id", "command", "command_line", "user", "host", "started_utc", "finished_utc", "software"):
        assert prov[key]
    assert prov["software"]["monai"] and prov["software"]["resunet"] and prov["software"]["torch"]
    assert prov["started_utc"].endswith("Z")
    assert len(prov["files"]["prediction"]) == 3 and len(prov["files"]["prediction"][0]["sha256"]) == 64
    names = {o["path"] for o in doc["outputs"]}
    assert names == {"metrics.csv", "summary.csv", "report.html", "report.pdf"}
    assert doc["conventions"]["bootstrap_resamples"] > 0


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.urls, self.text = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_with_sections_and_plots(report_dir):
    out, _, _ = report_dir
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    for sid, _ in SECTIONS:
        assert sid in parser.ids, sid
    # 2 label figures + 1 worst case per label, every one an inline PNG
    assert len(parser.imgs) == 4
    assert all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert not [u for u in parser.urls if not (u.startswith("#") or u.startswith("data:"))]
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    body = " ".join(parser.text)
    assert "lonely" in body  # the unmatched case is named
    for section, items in DEFINITIONS:  # every definition, from the one source of truth
        assert section in body
        for term, _ in items:
            assert term in body
    assert "pred_empty" in body and "never averaged" in body


def test_pdf_report_written(report_dir):
    out, written, _ = report_dir
    data = (out / "report.pdf").read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    assert written["pdf"] == out / "report.pdf"


def test_provenance_hashes_model_and_files(tmp_path):
    model = tmp_path / "brain.resunet.pt"
    model.write_bytes(b"weights")
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"abc")
    prov = collect_provenance(command=["resunet", "predict", "x y"], files={"image": [f]}, model_path=model)
    assert prov["model"]["name"] == "brain"
    import hashlib

    assert prov["model"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert prov["files"]["image"][0] == {"path": str(f.resolve()), "sha256": hashlib.sha256(b"abc").hexdigest(), "size_bytes": 3}
    assert prov["command_line"] == "resunet predict 'x y'"
    assert prov["software"]["python"] == ".".join(map(str, sys.version_info[:3]))
    json.dumps(prov)  # JSON-able


def test_docs_metrics_md_is_generated_from_definitions():
    doc = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert doc.read_text(encoding="utf-8") == to_markdown(), (
        "docs/metrics.md is stale: run `python -m resunet.evaluation.definitions > docs/metrics.md`"
    )


@pytest.mark.browser
def test_html_report_renders_offline_in_headless_chromium(report_dir, tmp_path):
    """Chromium, with every host name unresolvable, loads the report and decodes every plot."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    out, _, _ = report_dir
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
              " document.body.setAttribute('data-decoded', im.filter(i => i.complete && i.naturalWidth > 0).length);"
              " document.body.setAttribute('data-total', im.length); });</script></body>")  # fmt: skip
    probe.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", script))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-total="4"' in dom and 'data-decoded="4"' in dom
    assert 'id="definitions"' in dom and 'id="provenance"' in dom


def test_slice_figure_picks_the_plane_of_2d_images_and_the_worst_slice_of_3d():
    from resunet.io import Volume
    from resunet.reports.figures import case_slice_figure

    a = np.zeros((20, 30, 1), np.uint8)
    a[5:10, 5:20, 0] = 1
    fig = case_slice_figure("two_d", 1, Volume(np.roll(a, 2, 0), np.diag([2, 2, 1, 1])), Volume(a, np.diag([2, 2, 1, 1])))
    assert fig.axes[0].images[0].get_array().shape == (30, 20)  # j vertical, i horizontal
    ref = np.zeros((12, 12, 8), np.uint8)
    ref[2:8, 2:8, 1:7] = 1
    pred = ref.copy()
    pred[2:8, 2:8, 5] = 0  # disagreement only on slice k = 5 (k has the largest spacing)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    fig = case_slice_figure("three_d", 1, Volume(pred, aff), Volume(ref, aff))
    assert "axial slice 6 of 8 (voxel k = 5)" in fig._suptitle.get_text()


def _screen_of(fig, panel: int = 1) -> np.ndarray:
    """The mask overlay drawn in one panel of a case figure (the RGBA image above the grey one), as booleans."""
    return np.asarray(fig.axes[panel].images[1].get_array())[..., 3] > 0


def test_slice_figure_uses_patient_letters_and_the_pages_convention():
    """Issue 25 point 8: the worst-case slice is drawn like the web page (radiological: the patient's right
    on the left, anterior at the top) with R/L/A/P letters, whatever the voxel order of the file."""
    from resunet.io import Volume
    from resunet.reports.figures import case_slice_figure

    ras = np.zeros((20, 24, 10), np.uint8)
    ras[14:19, 16:22, 3:7] = 1  # the patient's right (high x) and anterior (high y) corner
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    # the same patient stored L->R flipped and P->A flipped (LPS voxel order): the picture must not change
    lps = ras[::-1, ::-1, :].copy()
    aff_lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    aff_lps[:3, 3] = [19.0, 23.0, 0.0]
    for arr, affine in ((ras, aff), (lps, aff_lps)):
        ref = Volume(arr, affine)
        pred = ref.with_array(np.roll(arr, 1, axis=2))
        fig = case_slice_figure("c", 1, pred, ref)
        title = fig._suptitle.get_text()
        assert "axial slice" in title, title
        for ax in fig.axes:
            assert [t.get_text() for t in ax.texts] == ["R", "L", "A", "P"]
            assert ax.get_xlabel() == "" and ax.get_ylabel() == ""
        shown = _screen_of(fig)  # the reference panel: rows = y from A (top), columns = x from R (left)
        rows, cols = np.nonzero(shown)
        assert shown.shape == (24, 20)
        assert rows.max() < 12 and cols.max() < 10, (rows.min(), rows.max(), cols.min(), cols.max())
        assert (rows.min(), cols.min()) == (24 - 22, 20 - 19)


def test_worst_cases_drawn_on_the_input_scan_named_in_predictions_json(tmp_path, capsys):
    """Issue 25 point 8: without --images, the report's worst-case slices show the input scan that
    predictions.json names (it said 'no image given (--images)'), and one case reads '1 case evaluated'."""
    import json

    from test_app_support import EXAMPLE_MASK, EXAMPLE_T1, make_tiny_model

    from resunet.cli import main
    from resunet.evaluation import evaluate_folders
    from resunet.reports.report import _case_volumes

    model = make_tiny_model(tmp_path / "tiny.pt")
    pred = tmp_path / "pred"
    assert main(["predict", str(EXAMPLE_T1), "--out", str(pred), "--model", str(model), "--no-tta", "--no-audit",
                 "--no-progress"]) == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "colin27_t1.nii.gz").write_bytes(EXAMPLE_MASK.read_bytes())
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(ref), "--out", str(out), "--audit-db",
                 str(tmp_path / "db"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1 case, NSD tolerance"), printed
    html = (out / "report.html").read_text()
    assert "1 case evaluated" in html and "1 cases" not in html and "(of 1 case)" in html
    doc = json.loads((out / "metrics.json").read_text())
    images = [f["path"] for f in doc["provenance"]["files"]["image"]]
    assert images == [str(EXAMPLE_T1)], images
    # the figure's image is the scan itself, on the reference grid
    ev = evaluate_folders(pred, ref, workers=1)
    _p, r, image, note = _case_volumes(ev, "colin27_t1", None, {"colin27_t1": EXAMPLE_T1})
    assert image is not None and note == "" and image.same_grid(r)
    assert np.array_equal(np.asarray(image.array), np.asarray(nib.load(str(EXAMPLE_T1)).dataobj))
