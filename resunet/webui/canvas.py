"""The slice canvas of "Edit mask": a Streamlit custom component returning strokes and clicks.

The frontend is one static file shipped in the package (``canvas_frontend/index.html``, package data):
no npm build, no network, no third-party JavaScript. It shows the rendered slice as two layers (the
grey slice, decoded again only when it changes, and the label overlay) and returns each mouse stroke
or click in image pixel coordinates, the coordinates :class:`resunet.webui.editor.MaskEditor` takes.
Why not ``streamlit-drawable-canvas`` (0.13.0 is on the registry and declares Streamlit >= 1.53): it
bundles Fabric.js and returns Fabric objects (SVG path commands, scaled canvas objects) that would
need converting back to image pixels, for a feature that needs points only; see docs/webui.md.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

#: The component's static frontend (package data).
FRONTEND_DIR = Path(__file__).with_name("canvas_frontend")


@lru_cache(maxsize=1)
def _component() -> Any:
    import streamlit.components.v1 as components  # the page imports Streamlit anyway; keep editor.py free of it

    return components.declare_component("resunet_slice_canvas", path=str(FRONTEND_DIR))


def png_data_url(image: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL (what the canvas draws)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: a slice is sent on every edit
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def slice_canvas(grey_url: str, overlay_url: str | None, width: int, height: int, *, brush_px: float,
                 colour: tuple[int, int, int], key: str, nonce: int = 0) -> dict[str, Any] | None:
    """Show a slice and return the last stroke/click: ``{"seq", "kind", "points": [[x, y], ...]}`` or None.

    Args:
        grey_url / overlay_url: PNG data URLs of the grey slice and of the RGBA label overlay, both
            ``width`` x ``height`` screen pixels.
        brush_px: brush radius drawn while the mouse moves, in screen pixels (feedback only; the edit
            itself is measured in mm by the editor).
        colour: RGB of the label being drawn.
        key: Streamlit widget key (one per view).
        nonce: changes when the page re-rendered after an edit (the browser test waits for it).

    A value keeps its ``seq`` across reruns: act on an event only once (compare with the last seq).
    """
    rgba = f"rgba({colour[0]},{colour[1]},{colour[2]},0.6)"
    return _component()(grey=grey_url, overlay=overlay_url, width=int(width), height=int(height),
                        brush_px=float(brush_px), colour=rgba, nonce=int(nonce), key=key, default=None)
