"""End-to-end review in headless Chromium (issue 21 point 4): run the model, erase a stroke, approve.

The stroke is real mouse input (``Input.dispatchMouseEvent``) on the canvas inside the component's
iframe. The saved corrected mask must equal the model's mask with exactly that stroke erased, as the
editor's geometry computes it from the points the canvas sent (read back from the iframe), and the
decision must be in the audit log with ``resunet audit verify`` passing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from test_app_support import EXAMPLE_T1, make_tiny_model, stop
from test_browser_app import CHROMIUM, ERRORS, IDLE, TABLE_SHOWN, VIEWS_SHOWN, chromium, start_app  # noqa: F401

from resunet.cli import main as cli_main
from resunet.inference.review import mask_sha256
from resunet.io.nifti import read_nifti
from resunet.reports.audit import read_runs
from resunet.webui.editor import MaskEditor

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]

FRAME = "document.querySelector('iframe[title*=\"slice_canvas\"]')"


def _click_text(page, selector: str, text: str) -> None:
    page.js(f"Array.from(document.querySelectorAll({json.dumps(selector)})).find(e => e.innerText.trim() === "
            f"{json.dumps(text)}).click()")


def _check(page, text: str) -> None:
    """Click the input (toggle, radio) of the widget label that reads ``text``."""
    page.js(f"Array.from(document.querySelectorAll('label')).find(e => e.innerText.trim() === {json.dumps(text)})"
            ".querySelector('input').click()")


def test_draw_a_stroke_and_approve_in_a_real_browser(chromium, tmp_path):
    model_dir = tmp_path / "models"
    make_tiny_model(model_dir / "tiny.pt", all_foreground=True)  # every voxel brain: an erased stroke shows
    url, proc, _log = start_app(tmp_path, model_dir, "tiny.pt")
    page = chromium
    try:
        page.call("Page.enable")
        page.call("Page.navigate", url=url)
        page.wait_for("document.body.innerText.includes('Model loaded and ready')", 600, "the model")
        page.js("Array.from(document.querySelectorAll('button')).find(b => b.innerText.includes('Example study')).click()")
        page.wait_for(f"{VIEWS_SHOWN} && {TABLE_SHOWN} && {IDLE}", 600, "the views and the volume table")
        _check(page, "Edit mask")
        page.wait_for(f"{FRAME} && {IDLE}", 60, "the slice canvas")
        _check(page, "erase")
        page.wait_for(f"{IDLE} && {FRAME}.contentDocument.body.dataset.rendered !== undefined", 60, "the drawn canvas")
        page.js(f"{FRAME}.scrollIntoView()")
        time.sleep(0.5)
        # the canvas inside the iframe, in page coordinates
        rect = page.js(f"(() => {{ const f = {FRAME}.getBoundingClientRect(); const c = {FRAME}.contentDocument"
                       ".getElementById('draw').getBoundingClientRect(); "
                       "return {x: f.x + c.x, y: f.y + c.y, w: c.width, h: c.height}; })()")
        before = page.js(f"{FRAME}.contentDocument.body.dataset.rendered")
        pts = [(0.3, 0.3), (0.4, 0.35), (0.5, 0.45), (0.55, 0.6)]
        xy = [(rect["x"] + fx * rect["w"], rect["y"] + fy * rect["h"]) for fx, fy in pts]
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=xy[0][0], y=xy[0][1])
        page.call("Input.dispatchMouseEvent", type="mousePressed", x=xy[0][0], y=xy[0][1], button="left", buttons=1,
                  clickCount=1)
        for x, y in xy[1:]:
            page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        page.call("Input.dispatchMouseEvent", type="mouseReleased", x=xy[-1][0], y=xy[-1][1], button="left",
                  buttons=0, clickCount=1)
        page.wait_for(f"{FRAME}.contentDocument.body.dataset.rendered !== {json.dumps(before)} && {IDLE}", 60,
                      "the redrawn overlay")
        sent = json.loads(page.js(f"{FRAME}.contentDocument.body.dataset.last"))
        assert sent["kind"] == "stroke" and len(sent["points"]) >= 4
        # anonymous on loopback: type the name, then approve
        page.js("document.querySelector('input[aria-label=\"Your name (required to sign off)\"]').focus()")
        page.call("Input.insertText", text="Dr Browser")
        for kind in ("keyDown", "keyUp"):
            page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        page.wait_for(IDLE, 60, "the name")
        _click_text(page, "button", "Approve")
        page.wait_for(f"document.body.innerText.includes('Approved by Dr Browser') && {IDLE}", 120, "the decision")
        assert page.js(ERRORS) == 0, page.js("document.body.innerText")
        # read the session's files while it lives (the page deletes them with the session)
        (session,) = sorted((tmp_path / "sessions").glob("session-*"))
        review_doc = json.loads((session / "review" / "review.json").read_text())["review"]
        corrected = read_nifti(session / "review" / "corrected.nii.gz")
        assert cli_main(["audit", "verify", str(session / "review")]) == 0
    finally:
        stop(proc)
    # the tiny model calls every voxel brain: its mask is all 1 on the example's grid
    src = read_nifti(EXAMPLE_T1)
    model = src.with_array(np.ones(src.shape, np.uint8), is_label=True)
    assert review_doc["model_mask_sha256"] == mask_sha256(model)
    assert review_doc["corrected_mask_sha256"] == mask_sha256(corrected)
    expected = MaskEditor(model)
    view, index = "axial", expected.display.n_slices("axial") // 2  # the page's default slice
    assert expected.brush(view, index, [tuple(p) for p in sent["points"]], radius_mm=3.0, label=1, erase=True)
    assert np.count_nonzero(np.asarray(model.array) != np.asarray(corrected.array)) > 10
    assert np.array_equal(np.asarray(corrected.array), expected.corrected.array)
    runs = [r for r in read_runs(tmp_path / "audit.sqlite") if r["kind"] == "review"]
    assert len(runs) == 1 and runs[0]["provenance"]["user"] == "Dr Browser"
