"""The page's "Correct and sign off" section (issue 21 points 2-3): edit the mask, compare, approve/reject.

The editing is :class:`resunet.webui.editor.MaskEditor`; the canvas is :mod:`resunet.webui.canvas`;
the comparison uses :func:`resunet.evaluation.metrics.evaluate_case` (Dice, HD95, volumes); the
decision is written by :mod:`resunet.inference.review` (corrected NIfTI / SEG / RTSTRUCT,
``review.json``, one audit record) so the page, the service and the CLI keep one record format.
:func:`comparison_rows` and :func:`sign_off` hold no Streamlit and are tested directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from resunet.errors import ResunetError
from resunet.inference.review import comparison_rows
from resunet.io.volume import Volume


def sign_off(*, decision: str, reviewer: str, comment: str, subject: str, source: Volume, input_path: Path,
             model_mask: Volume, corrected: Volume | None, labels: Mapping[int, str], folder: Path,
             model_path: Path | None, model_name: str, model_sha256: str | None, model_seg: Path | None = None,
             db_path: Any = None) -> Path:
    """Record an approve/reject decision of the web page through :mod:`resunet.inference.review`.

    ``corrected`` None (or equal to the model's mask) decides on the model's mask as it is; otherwise the
    corrected mask is written (NIfTI always; SEG + RTSTRUCT for DICOM input) and hashed into the record,
    with ``comparison.csv`` (:func:`comparison_rows`: volumes of both masks, Dice, HD95).
    Returns the path of ``review.json``. Raises InputError (no reviewer) or AlreadyDecided (a decision on
    ``subject`` is in the audit log: the message says so without paths) for the page.
    """
    from resunet.inference import review
    from resunet.reports import collect_provenance

    d = review.check_decision(decision, reviewer)
    reviewer = reviewer.strip()
    review.check_not_decided(subject, db_path)  # before any file is written; AlreadyDecided says what to do
    changed = corrected is not None and not np.array_equal(np.asarray(corrected.array), np.asarray(model_mask.array))
    files: dict[str, Path] = {}
    corrected_hash = None
    if changed:
        assert corrected is not None
        corrected = model_mask.with_array(np.asarray(corrected.array).astype(np.uint8), is_label=True)
        files = review.write_corrected(corrected, source, folder, labels, reviewer=reviewer, model_seg=model_seg,
                                       model_name=model_name, model_sha256=model_sha256, uid_seed=subject,
                                       rtstruct=True, approved=d == "approve")
        corrected_hash = review.mask_sha256(corrected)
        comparison = review.write_comparison(model_mask, corrected, labels, folder)
        if comparison is not None:
            files["comparison"] = comparison
    from resunet.io.hashing import sha256_path

    dec = review.Decision(
        subject=subject, decision=d, reviewer=reviewer, comment=str(comment or "").strip(),
        input_sha256=sha256_path(input_path), model_mask_sha256=review.mask_sha256(model_mask),
        corrected_mask_sha256=corrected_hash,
        voxels_changed=review.voxels_changed(model_mask, corrected if changed else model_mask, labels))
    prov = collect_provenance(command=["resunet", "app", "review"], files={"input": [input_path]},
                              model_path=model_path, model_name=model_name)
    prov["web_user"] = reviewer
    return review.record_decision(dec, folder, prov, db_path=db_path, files=files)


# -- the page (Streamlit) ---------------------------------------------------------------------------


def _overlay_rgba(lab2d: np.ndarray, size: tuple[int, int], opacity: float) -> Any:
    """RGBA overlay of a label slice at screen ``size`` (w, h): the label colours, transparent elsewhere.

    Hand-written rather than viewer.render_slice: that composites onto the grey slice, while the canvas
    keeps the grey layer and redraws only this one after an edit.
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from resunet.webui.viewer import label_colour

    lab = np.asarray(Image.fromarray(np.ascontiguousarray(lab2d).astype(np.int32), mode="I").resize(
        size, Image.Resampling.NEAREST))
    rgba = np.zeros(lab.shape + (4,), np.uint8)
    edges = find_boundaries(lab, mode="inner")
    for v in (int(x) for x in np.unique(lab) if x != 0):
        sel = lab == v
        rgba[sel, :3] = label_colour(v)
        rgba[sel, 3] = int(round(255 * opacity))
        rgba[sel & edges, 3] = 255
    return Image.fromarray(rgba, mode="RGBA")


def edit_section(staged: Any, volume: Volume, result: Any, ws: Any, web_user: str | None,
                 model_path: str | None) -> None:
    """"4b. Correct and sign off": the editor, the comparison and approve/reject (see docs/webui.md)."""
    import streamlit as st

    st.subheader("Correct and sign off")
    labels = {int(r["label"]): str(r["name"]) for r in result.rows}
    ed = editor_panel(volume, result.mask, labels, owner=("local", id(result)), prefix="edit")
    state = st.session_state["edit_state"]
    _sign_off_controls(st, staged, volume, result, ws, web_user, model_path, ed, labels, state)


def editor_panel(volume: Volume, model_mask: Volume, labels: Mapping[int, str], *, owner: Any,
                 prefix: str = "edit") -> Any:
    """The mask editor on ``volume`` (toggle, tools, canvas) and the model-vs-corrected table; returns the
    :class:`~resunet.webui.editor.MaskEditor` (its ``corrected`` is the reviewer's mask).

    One code path for both reviews: the local run's "Correct and sign off" (``prefix="edit"``) and a
    service job opened from "To review" (:mod:`resunet.webui.review_queue`, ``prefix="review_edit"``).
    The widgets' keys start with ``prefix`` and the editor lives in ``st.session_state[prefix + "_state"]``;
    a new ``owner`` (another result or job) starts a fresh editor on its ``model_mask``. After a decision
    (``state["decided"]`` set by the caller) the toggle is disabled.

    Args:
        volume: the scan the mask lies on (its grid is the mask's).
        model_mask: the model's label map on ``volume``'s grid (not changed).
        labels: foreground label value -> name (0 is ignored).
        owner: any hashable naming what is reviewed.
        prefix: the widget-key and state prefix.
    """
    import streamlit as st

    from resunet.webui import canvas, viewer
    from resunet.webui.editor import MaskEditor

    labels = {int(k): str(v) for k, v in labels.items() if int(k) > 0}
    state = st.session_state.setdefault(f"{prefix}_state", {})
    if state.get("owner") != owner:
        state.clear()
        state.update(owner=owner, editor=MaskEditor(model_mask), grey={}, seq={}, decided=None)
    ed: MaskEditor = state["editor"]
    editing = st.toggle("Edit mask", key=f"{prefix}_mode", disabled=state["decided"] is not None)
    if editing and labels:
        _editor_controls(st, canvas, viewer, ed, volume, labels, state, prefix)
    try:
        rows = comparison_rows(model_mask, ed.corrected, {0: "background", **labels})
    except ResunetError as err:
        rows = []
        st.caption(f"No Dice/HD95: {err}")
    if rows:
        st.caption(f"Model vs corrected ({ed.voxels_changed()} voxels changed); Dice/HD95 of the model against the "
                   "corrected mask")
        st.dataframe(rows, hide_index=True, width="stretch", key=f"{prefix}_comparison")
    return ed


def _editor_controls(st: Any, canvas: Any, viewer: Any, ed: Any, volume: Volume, labels: dict[int, str],
                     state: dict, prefix: str = "edit") -> None:
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
    with c1:
        label = st.selectbox("Label", list(labels), format_func=lambda v: f"{v}: {labels[v]}", key=f"{prefix}_label")
        view = st.selectbox("View", list(viewer.VIEWS), key=f"{prefix}_view")
    with c2:
        tool = st.radio("Tool", ["paint", "erase", "fill", "delete"], horizontal=True, key=f"{prefix}_tool")
        radius = st.number_input("Brush radius (mm)", min_value=0.0, max_value=50.0, value=3.0, step=0.5,
                                 key=f"{prefix}_radius")
    n = ed.display.n_slices(view)
    with c3:
        idx = st.slider("Slice", 1, n, n // 2 + 1, key=f"{prefix}_slice_{view}") - 1 if n > 1 else 0
    ckey = f"{prefix}_canvas_{view}"
    event = st.session_state.get(ckey)  # the last stroke, applied before drawing so the canvas shows it
    if isinstance(event, dict) and event.get("seq") != state["seq"].get(ckey) and event.get("points"):
        state["seq"][ckey] = event.get("seq")
        pts = [(float(p[0]), float(p[1])) for p in event["points"]]
        if tool in ("paint", "erase"):
            ed.brush(view, idx, pts, radius_mm=float(radius), label=int(label), erase=tool == "erase")
        elif tool == "fill":
            ed.fill(view, idx, pts[0], label=int(label))
        else:
            ed.delete(view, idx, pts[0])
    with c4:
        b1, b2, b3 = st.columns(3)
        if b1.button("Undo", disabled=not ed.can_undo, key=f"{prefix}_undo"):
            ed.undo()
        if b2.button("Redo", disabled=not ed.can_redo, key=f"{prefix}_redo"):
            ed.redo()
        edited = ed.edited_slices(view, int(label))
        if b3.button("Interpolate", disabled=len(edited) < 2, key=f"{prefix}_interp",
                     help="fill the slices between the edited slices of this label (shape-based)"):
            ed.interpolate(view, int(label))
        st.caption(f"Edited {view} slices of label {label}: {', '.join(str(i + 1) for i in edited) or 'none'}")
    img = state.get("image")
    if img is None:
        img = state["image"] = viewer.to_display(volume)
        state["window"] = viewer.auto_window(img.array)
    w, h = ed.image_size(view)
    gkey = (view, idx)
    if gkey not in state["grey"]:  # the grey slice is encoded once; an edit re-sends the overlay only
        from PIL import Image

        grey = viewer.apply_window(img.slice2d(view, idx), *state["window"])
        while len(state["grey"]) >= 64:
            state["grey"].pop(next(iter(state["grey"])))
        state["grey"][gkey] = canvas.png_data_url(Image.fromarray(grey, mode="L").resize((w, h),
                                                  Image.Resampling.BILINEAR))
    overlay = canvas.png_data_url(_overlay_rgba(ed.display.slice2d(view, idx), (w, h), 0.4))
    canvas.slice_canvas(state["grey"][gkey], overlay, w, h, brush_px=max(1.0, float(radius) * ed.mm_to_px),
                        colour=viewer.label_colour(int(label)), key=ckey, nonce=ed.revision)


def _sign_off_controls(st: Any, staged: Any, volume: Volume, result: Any, ws: Any, web_user: str | None,
                       model_path: str | None, ed: Any, labels: dict[int, str], state: dict) -> None:
    if state["decided"] is not None:
        st.success(state["decided"]["text"])
        for name, data in state["decided"]["files"].items():
            st.download_button(f"Download {name}", data=data, file_name=name, key=f"review-dl-{name}")
        return
    if web_user:
        reviewer = web_user
        st.caption(f"Signing as **{web_user}**")
    else:
        reviewer = st.text_input("Your name (required to sign off)", key="review_name")
    comment = st.text_input("Comment (optional)", key="review_comment")
    c1, c2 = st.columns(2)
    choice = "approve" if c1.button("Approve", key="review_approve") else None
    if c2.button("Reject", key="review_reject"):
        choice = "reject"
    if choice is None:
        return
    if not str(reviewer or "").strip():
        st.error("Enter your name before approving or rejecting: the decision is recorded under it.", icon="⚠️")
        return
    out = ws.path / "out"
    segs = sorted(out.glob("mask*.seg.dcm")) if out.is_dir() else []
    subject = f"web-{result.audit_run_id or result.input_sha256[:16]}"
    folder = ws.subdir("review")
    try:
        path = sign_off(decision=choice, reviewer=str(reviewer), comment=comment, subject=subject, source=volume,
                        input_path=Path(staged.path), model_mask=result.mask, corrected=ed.corrected, labels=labels,
                        folder=folder, model_path=Path(model_path) if model_path else None,
                        model_name=result.model_name, model_sha256=result.model_sha256,
                        model_seg=segs[0] if segs else None)
    except ResunetError as err:
        st.error(f"The decision was not recorded: {err}", icon="⚠️")
        return
    files = {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.is_file()}
    state["decided"] = {"text": f"{'Approved' if choice == 'approve' else 'Rejected'} by {str(reviewer).strip()}; recorded in the audit log "
                        f"(run review-{subject}).", "files": files, "review_json": str(path)}
    st.rerun()
