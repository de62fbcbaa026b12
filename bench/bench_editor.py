"""Edit-to-redraw time of the review page's mask editor in a real browser (issue 21 point 5).

Starts the page with ``resunet app`` (tiny all-brain checkpoint: the model's speed is not measured
here), opens it in headless Chromium, runs the example, turns on "Edit mask" with the erase tool and
draws 10 strokes on the axial canvas with real mouse events. Each stroke's time runs from the mouse
release to the canvas having drawn the new overlay (the iframe's ``data-rendered`` changes, set after
the overlay image is decoded and drawn): the server's rerun, the edit, the overlay PNG, the transfer
and the browser's drawing. Writes bench/results/editor.json and editor.md (median, min, max, load).

Reuses the browser test's DevTools client and page start-up (tests/test_browser_app.py) rather than a
second copy. Run with nothing else on the machine: ``.venv/bin/python bench/bench_editor.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))

FRAME = "document.querySelector('iframe[title*=\"slice_canvas\"]')"


def render(doc: dict) -> str:
    """editor.md from editor.json's figures."""
    t = doc["redraw_s"]
    return (
        "# Mask editor: edit-to-redraw in the browser\n\n"
        f"`bench/bench_editor.py`, {doc['strokes']} erase strokes on the example's axial view "
        f"({doc['canvas_px'][0]}x{doc['canvas_px'][1]} px canvas), headless Chromium, `resunet app` on loopback; "
        f"load average {doc['load_before']:.2f} before, {doc['load_after']:.2f} after; {doc['cpus']} CPUs; {doc['utc']}.\n\n"
        "| | seconds |\n|---|---|\n"
        f"| median | {statistics.median(t):.3f} |\n| min | {min(t):.3f} |\n| max | {max(t):.3f} |\n\n"
        "From the mouse release to the new overlay drawn on the canvas (server rerun, edit, overlay PNG, "
        "transfer, drawing). One run; figures depend on the machine's load.\n"
    )


def main() -> int:
    from test_app_support import free_port, make_tiny_model, stop, wait_http
    from test_browser_app import CHROMIUM, IDLE, TABLE_SHOWN, VIEWS_SHOWN, DevTools, start_app

    tmp = Path(tempfile.mkdtemp(prefix="bench-editor-"))
    make_tiny_model(tmp / "models" / "tiny.pt", all_foreground=True)
    url, app, _log = start_app(tmp, tmp / "models", "tiny.pt")
    port = free_port()
    chrome = subprocess.Popen([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={tmp / 'profile'}", f"--remote-debugging-port={port}",
                               "--remote-allow-origins=*", "--window-size=2100,2000", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 30, chrome))
        page = DevTools(next(t for t in targets if t.get("type") == "page")["webSocketDebuggerUrl"])
        page.call("Emulation.setDeviceMetricsOverride", width=2100, height=2000, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=url)
        page.wait_for("document.body.innerText.includes('Model loaded and ready')", 600, "the model")
        page.js("Array.from(document.querySelectorAll('button')).find(b => b.innerText.includes('Example study')).click()")
        page.wait_for(f"{VIEWS_SHOWN} && {TABLE_SHOWN} && {IDLE}", 600, "the views")
        for text in ("Edit mask", "erase"):
            page.js(f"Array.from(document.querySelectorAll('label')).find(e => e.innerText.trim() === {json.dumps(text)})"
                    ".querySelector('input').click()")
            page.wait_for(f"{IDLE} && {FRAME} && {FRAME}.contentDocument.body.dataset.rendered !== undefined", 60, text)
        page.js(f"{FRAME}.scrollIntoView()")
        time.sleep(1.0)
        rect = page.js(f"(() => {{ const f = {FRAME}.getBoundingClientRect(); const c = {FRAME}.contentDocument"
                       ".getElementById('draw').getBoundingClientRect(); "
                       "return {x: f.x + c.x, y: f.y + c.y, w: c.width, h: c.height}; })()")
        load_before = os.getloadavg()[0]
        times = []
        for n in range(10):
            y = rect["y"] + rect["h"] * (0.15 + 0.07 * n)
            xs = [rect["x"] + rect["w"] * f for f in (0.2, 0.35, 0.5, 0.65)]
            before = page.js(f"{FRAME}.contentDocument.body.dataset.rendered")
            page.call("Input.dispatchMouseEvent", type="mousePressed", x=xs[0], y=y, button="left", buttons=1, clickCount=1)
            for x in xs[1:]:
                page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            start = time.perf_counter()
            page.call("Input.dispatchMouseEvent", type="mouseReleased", x=xs[-1], y=y, button="left", buttons=0,
                      clickCount=1)
            page.wait_for(f"{FRAME}.contentDocument.body.dataset.rendered !== {json.dumps(before)}", 60, "the redraw")
            times.append(round(time.perf_counter() - start, 4))
            page.wait_for(IDLE, 60, "the end of the rerun")
        page.close()
    finally:
        stop(chrome)
        stop(app)
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"strokes": len(times), "redraw_s": times, "canvas_px": [round(rect["w"]), round(rect["h"])],
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
           "cpus": os.cpu_count(), "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "editor.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "editor.md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
