"""resunet web UI: drop in a study, see the mask over the scan in three planes, read and download results.

Start with ``resunet app`` (binds to 127.0.0.1) or ``streamlit run resunet/webui/streamlit_app.py``.
The page has no segmentation logic of its own: it calls ``resunet.io`` to read, the
``resunet.inference.Predictor`` to segment, ``resunet.evaluation`` to compare with a reference and
the library writers for downloads. Display rendering lives in :mod:`resunet.webui.viewer`.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import streamlit as st

from resunet.webui import viewer
from resunet.webui.auth import require_login
from resunet.webui.config import AppConfig
from resunet.webui.inputs import StagedStudy, friendly_path_message, newest_upload, stage_bundled, stage_uploads
from resunet.webui.models import (ModelInfo, card_markdown, describe_model, list_checkpoints, modality_text,
                                  option_label)
from resunet.webui.runner import PREDICTORS, RunResult, run_prediction
from resunet.webui.workspace import SessionWorkspace, start_janitor, sweep_expired
from resunet import __version__
from resunet.errors import ResunetError

log = logging.getLogger("resunet.app")

#: Results (mask + uncertainty arrays) kept per session; the oldest is dropped beyond this.
MAX_RESULTS_PER_SESSION = 6


# -- session plumbing ----------------------------------------------------------------------------


def _config() -> AppConfig:
    if "config" not in st.session_state:
        cfg = AppConfig.from_env()
        # the browser enforces Streamlit's own limit; never promise more than it allows
        server_mb = int(st.get_option("server.maxUploadSize") or cfg.max_upload_mb)
        cfg.max_upload_mb = min(cfg.max_upload_mb, server_mb)
        st.session_state["config"] = cfg
    return st.session_state["config"]


def _workspace(cfg: AppConfig) -> SessionWorkspace:
    ws: SessionWorkspace | None = st.session_state.get("workspace")
    ttl_s = cfg.session_ttl_min * 60
    if ws is not None and ws.expired():
        ws.close()
        for key in ("study", "results", "volumes", "series", "display", "evaluations", "png", "auto_window", "uploads"):
            st.session_state.pop(key, None)
        st.session_state["expired_notice"] = True
        ws = None
    if ws is None:
        ws = SessionWorkspace(cfg.temp_dir, ttl_s)
        st.session_state["workspace"] = ws
    ws.touch()
    sweep_expired(cfg.temp_dir, ttl_s, closed_after_s=cfg.session_close_s)
    start_janitor(cfg.temp_dir, ttl_s, cfg.session_close_s, interval_s=_heartbeat_s(cfg))
    return ws


def _heartbeat_s(cfg: AppConfig) -> float:
    """How often an open page says its tab is still open (and the janitor sweeps), seconds."""
    return max(1.0, cfg.session_close_s / 4)


def _heartbeat(cfg: AppConfig, ws: SessionWorkspace) -> None:
    """A fragment the browser reruns every few seconds while the tab is open: the tab-closed signal."""

    @st.fragment(run_every=_heartbeat_s(cfg))
    def beat() -> None:
        ws.heartbeat()

    beat()


def _web_user() -> str | None:
    from resunet.webui.auth import web_user

    return web_user()


def _store(name: str) -> dict:
    return st.session_state.setdefault(name, {})


def _show_error(err: BaseException, staged: StagedStudy | None = None) -> None:
    msg = str(err)
    if staged is not None:
        msg = friendly_path_message(msg, staged)
    st.error(msg, icon="⚠️")


# -- sections ------------------------------------------------------------------------------------


def _input_section(cfg: AppConfig, ws: SessionWorkspace) -> None:
    st.subheader("1. Study")
    left, right = st.columns([3, 1])
    with left:
        files = st.file_uploader(
            "Upload a NIfTI file (.nii/.nii.gz), a .zip of DICOM files, or several DICOM files",
            accept_multiple_files=True,
            key="upload",
            help=f"Limit {cfg.max_upload_mb} MB per upload (set with `resunet app --max-upload-mb`).",
        )
    with right:
        st.write("")
        example = st.button("Example study", type="primary", key="example", help=str(cfg.example_study.name))
    if example:
        try:
            t0 = time.perf_counter()
            st.session_state["study"] = stage_bundled(cfg.example_study)
            st.session_state["study_t0"] = (st.session_state["study"].sha256, t0)
            st.session_state["study_error"] = None
            st.session_state["upload_sig"] = _upload_signature(files)
            st.session_state["upload_ids"] = {f.file_id for f in files or []}
            st.session_state["upload_unused"] = 0
        except ResunetError as err:
            st.session_state["study_error"] = str(err)
    sig = _upload_signature(files)
    if files and sig != st.session_state.get("upload_sig"):
        st.session_state["upload_sig"] = sig
        # a second study dropped on the box is appended to the first: the newest upload wins
        chosen = newest_upload(files, st.session_state.get("upload_ids", ()))
        st.session_state["upload_ids"] = {f.file_id for f in files}
        st.session_state["upload_unused"] = len(files) - len(chosen)
        dest = ws.subdir("upload")  # replaces the previous upload's files: one study on disk per session
        _store("volumes").clear()
        try:
            t0 = time.perf_counter()
            st.session_state["study"] = stage_uploads([(f.name, f.getvalue()) for f in chosen], dest,
                                                      cfg.max_upload_bytes)
            st.session_state["study_t0"] = (st.session_state["study"].sha256, t0)
            st.session_state["study_error"] = None
            log.info("staged an upload of %d file(s)", len(chosen))  # no names: they may hold patient names
        except ResunetError as err:
            st.session_state["study"] = None
            st.session_state["study_error"] = str(err)
    elif not files and st.session_state.get("upload_sig") and st.session_state.get("upload_sig") != ():
        st.session_state["upload_sig"] = ()
    if not files:
        st.session_state["upload_ids"] = set()
        st.session_state["upload_unused"] = 0
    elif st.session_state.get("upload_unused"):
        with left:
            st.caption(f"Showing the newest upload; the {st.session_state['upload_unused']} earlier file(s) in the "
                       "box are not used (remove them with × to tidy up).")
    if cfg.pacs_url:
        _pacs_browser(cfg, ws, files)
    if st.session_state.get("study_error"):
        st.error(st.session_state["study_error"], icon="⚠️")


def _pacs_browser(cfg: AppConfig, ws: SessionWorkspace, files: Any) -> None:
    """Browse PACS: studies listed (QIDO-RS or C-FIND); the chosen one is pulled (WADO-RS, C-GET/C-MOVE) as the study."""
    from resunet.webui.pacs import archive_for, filter_inputs, stage_from_pacs, study_label

    with st.expander(f"Browse PACS ({cfg.pacs_url})", expanded=False):
        query = filter_inputs(st)
        try:
            if (st.button("Refresh the list", key="pacs_refresh") or "pacs_studies" not in st.session_state
                    or st.session_state.get("pacs_query") != query):
                st.session_state["pacs_query"] = query
                st.session_state["pacs_studies"] = archive_for(cfg).search(*query)
        except ResunetError as err:
            st.session_state.pop("pacs_studies", None)
            st.error(str(err), icon="⚠️")
            return
        studies = st.session_state["pacs_studies"]
        if not studies:
            st.info("The PACS lists no studies.")
            return
        i = st.selectbox(f"{len(studies)} studies", options=list(range(len(studies))),
                         format_func=lambda k: study_label(studies[k]), key="pacs_study")
        if st.button("Open this study", key="pacs_open"):
            chosen = studies[int(i)]
            try:
                with st.spinner("Pulling the study from the PACS…"):
                    staged = stage_from_pacs(archive_for(cfg), chosen.study_uid, ws.subdir("pacs"),
                                             study_label(chosen))
            except ResunetError as err:
                st.session_state["study_error"] = str(err)
                return
            _store("volumes").clear()
            st.session_state["study"] = staged
            st.session_state["study_error"] = None
            st.session_state["upload_sig"] = _upload_signature(files)
            _store("pacs_origin")[staged.sha256] = chosen.study_uid


def _pacs_send(cfg: AppConfig, staged: StagedStudy, result: RunResult) -> None:
    """For a study opened from the PACS: store its SEG (and RTSTRUCT) back into the study (STOW-RS or C-STORE)."""
    study_uid = _store("pacs_origin").get(staged.sha256)
    if not cfg.pacs_url or study_uid is None:
        return
    from resunet.webui.pacs import archive_for

    sent = _store("pacs_sent")
    what = st.multiselect("Send to the PACS", ["mask.seg.dcm", "mask.rtstruct.dcm"], default=["mask.seg.dcm"],
                          key="pacs_send_what")
    if st.button("Send to PACS", key="pacs_send", disabled=not what):
        folder = st.session_state["workspace"].subdir("pacs-send")
        files = []
        for name in what:  # the bytes the download buttons offer, so the PACS gets the same files
            (folder / name).write_bytes(result.downloads["mask"][name][0])
            files.append(folder / name)
        try:
            with st.spinner("Storing into the study on the PACS…"):
                archive_for(cfg).store(files, study_uid)
        except ResunetError as err:
            st.error(str(err), icon="⚠️")
            return
        sent[id(result)] = list(what)
    if id(result) in sent:
        st.success(f"Stored {', '.join(sent[id(result)])} in study {study_uid} on {cfg.pacs_url}.")


def _upload_signature(files: Any) -> tuple:
    return tuple((f.file_id, f.name, f.size) for f in files or [])


def _pick_series(staged: StagedStudy) -> tuple[str | None, bool]:
    """The chosen series uid (None for NIfTI / default); False if the study cannot be read."""
    if staged.kind != "dicom":
        return None, True
    from resunet.io import list_series

    cache = _store("series")
    if staged.sha256 not in cache:
        try:
            cache[staged.sha256] = list_series(staged.path)
        except ResunetError as err:
            _show_error(err, staged)
            return None, False
    series = cache[staged.sha256]
    if len(series) <= 1:
        return (series[0].uid if series else None), True

    def fmt(i: int) -> str:
        s = series[i]
        desc = s.description or "(no description)"
        return f"{desc} · {s.modality or '?'} · {s.n_slices} slices · {s.rows}×{s.cols}"

    i = st.selectbox(
        f"This study has {len(series)} image series; choose one",
        options=list(range(len(series))),
        format_func=fmt,
        key=f"series-{staged.sha256[:16]}",
    )
    return series[int(i)].uid, True


def _load_volume(staged: StagedStudy, uid: str | None):
    from resunet.io import load_study

    cache = _store("volumes")
    key = (staged.sha256, uid)
    if key not in cache:
        cache.clear()  # keep one study in memory per session
        cache[key] = load_study(staged.path, series_uid=uid)
    return cache[key]


def _model_section(cfg: AppConfig) -> ModelInfo | None:
    paths = list_checkpoints(cfg.model_dir)
    default = cfg.default_model_path
    if default.exists() and default not in paths:
        paths.insert(0, default)
    with st.sidebar:
        st.header("Model")
        if not paths:
            st.error(
                f"No model checkpoint (*.pt) in {cfg.model_dir}. Put one there or start with "
                "`resunet app --model-dir DIR`.",
                icon="⚠️",
            )
            return None
        index = paths.index(default) if default in paths else 0
        chosen = st.selectbox("Checkpoint", options=paths, index=index, format_func=option_label, key="model")
        info = describe_model(Path(chosen))
        with st.expander("Model card", expanded=False):
            st.markdown(card_markdown(info))
        if info.error:
            st.error(info.error, icon="⚠️")
            return None
        st.checkbox("Test-time augmentation (mirroring; several times slower on CPU)", key="tta")
        st.checkbox("Uncertainty map (entropy across mirrored passes; implies test-time augmentation)",
                    key="uncertainty")
        PREDICTORS.preload(info.path, info.sha256, cfg.device, *_options())
        if PREDICTORS.state(info.path, info.sha256, cfg.device, *_options()) == "loading":
            _model_loading(info, cfg)
        else:
            _model_status(info, cfg)
        return info


def _model_status(info: ModelInfo, cfg: AppConfig) -> None:
    state = PREDICTORS.state(info.path, info.sha256, cfg.device, *_options())
    if state == "ready":
        st.caption("Model loaded and ready.")
    elif state == "loading":
        st.caption("Loading the model…")
    else:
        st.caption("The model loads on the first run.")


@st.fragment(run_every=1.0)
def _model_loading(info: ModelInfo, cfg: AppConfig) -> None:
    """Polls once a second while the model loads in the background, then redraws the page once."""
    if PREDICTORS.state(info.path, info.sha256, cfg.device, *_options()) != "loading":
        st.rerun(scope="app")
    _model_status(info, cfg)


def _options() -> tuple[bool, bool]:
    unc = bool(st.session_state.get("uncertainty"))
    return bool(st.session_state.get("tta")) or unc, unc


def _result_key(staged: StagedStudy, uid: str | None, model: ModelInfo) -> tuple:
    return (staged.sha256, uid, model.sha256, *_options())


def _run(cfg: AppConfig, staged: StagedStudy, uid: str | None, volume: Any, model: ModelInfo) -> RunResult | None:
    results = _store("results")
    key = _result_key(staged, uid, model)
    if key in results:
        return results[key]
    bar = st.progress(0.0, text="Loading the model…")
    try:
        predictor = PREDICTORS.get(model.path, model.sha256, cfg.device, *_options())

        def progress(frac: float, text: str) -> None:
            bar.progress(frac, text=f"Segmenting… {text}".strip())

        result = run_prediction(
            predictor,
            volume,
            label_names=model.labels,
            model_name=model.name,
            model_sha256=model.sha256,
            input_sha256=staged.sha256,
            progress=progress,
        )
    except ResunetError as err:
        bar.empty()
        _show_error(err, staged)
        return None
    bar.empty()
    log.info("segmented input %s with model %s in %.1f s", staged.sha256[:12], model.sha256[:12], result.seconds)
    while len(results) >= MAX_RESULTS_PER_SESSION:  # masks are input-sized arrays: bound the memory
        results.pop(next(iter(results)))
    results[key] = result
    return result


def _display(name: str, key: tuple, vol: Any) -> viewer.DisplayVolume:
    cache = _store("display")
    k = (name, key)
    if k not in cache:
        for old in [c for c in cache if c[0] == name]:
            del cache[old]
        cache[k] = viewer.to_display(vol)
    return cache[k]


@st.fragment
def _viewer_section(staged: StagedStudy, uid: str | None, volume: Any, result: RunResult | None) -> None:
    """Three views with sliders; a fragment, so moving a slider re-runs only this part of the page."""
    try:
        _viewer(staged, uid, volume, result)
    except Exception as err:  # noqa: BLE001 - see _unexpected
        _unexpected(err, "drawing the views")


def _viewer(staged: StagedStudy, uid: str | None, volume: Any, result: RunResult | None) -> None:
    ws = st.session_state.get("workspace")
    if ws is not None:
        ws.touch()  # looking at the images is activity too (fragment reruns skip main())
    key = (staged.sha256, uid)
    img = _display("image", key, volume)
    mask = _display("mask", key + (id(result),), result.mask) if result is not None else None
    unc = None
    if result is not None and result.uncertainty is not None:
        unc = _display("uncertainty", key + (id(result),), result.uncertainty)

    modality = str(volume.meta.get("modality") or "").upper()
    presets = [viewer.AUTO_PRESET, *viewer.WINDOW_PRESETS, "Manual"]
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    with c1:
        default_preset = "CT soft tissue" if modality == "CT" else viewer.AUTO_PRESET
        preset = st.selectbox("Window", presets, index=presets.index(default_preset), key="window_preset")
    auto = _store("auto_window").setdefault(key, viewer.auto_window(img.array))
    if preset == viewer.AUTO_PRESET:
        window = auto
    elif preset == "Manual":
        with c2:
            w = st.number_input("Width", value=float(round(auto[0], 1)), min_value=1.0, key="win_w")
            lvl = st.number_input("Level", value=float(round(auto[1], 1)), key="win_l")
        window = (w, lvl)
    else:
        window = viewer.WINDOW_PRESETS[preset]
    with c3:
        opacity = st.slider("Mask opacity", 0.0, 1.0, 0.4, 0.05, key="opacity")
    with c4:
        outline = st.checkbox("Outlines", value=True, key="outline")
        show_unc = st.checkbox("Uncertainty", value=False, key="show_unc", disabled=unc is None,
                               help=None if unc is not None else "this model run gave no uncertainty map")
    if preset not in ("Manual",):
        with c2:
            st.caption(f"Width {window[0]:.0f}, level {window[1]:.0f}")
    if img.oblique:
        st.caption("The scan is oblique: shown on its nearest patient axes. Downloads keep the exact geometry.")

    scale = viewer.scale_for(img)
    cols = st.columns(3)
    start = time.perf_counter()
    pngs = _store("png")
    for col, view in zip(cols, viewer.VIEWS):
        with col:
            n = img.n_slices(view)
            idx = st.slider(f"{view.capitalize()} slice", 1, n, n // 2 + 1, key=f"slice_{view}") if n > 1 else 1
            # a slider move changes one view: the other two come from this per-session cache of PNGs
            pkey = (key, id(result) if result else None, view, idx, window, opacity, outline,
                    bool(show_unc and unc is not None))
            if pkey not in pngs:
                pic = viewer.render_slice(
                    img,
                    view,
                    idx - 1,
                    window=window,
                    mask=mask,
                    opacity=opacity,
                    outline=outline,
                    uncertainty=unc if show_unc else None,
                    mm_to_px=scale,
                )
                buf = io.BytesIO()
                pic.save(buf, format="PNG", compress_level=1)
                while len(pngs) >= 96:
                    pngs.pop(next(iter(pngs)))
                pngs[pkey] = buf.getvalue()
            # output_format: without it Streamlit re-encodes an RGB PNG as JPEG (quality 90), which smears the
            # one-pixel mask outlines into the scan
            st.image(pngs[pkey], caption=f"{view} {idx}/{n}", output_format="PNG")
    st.session_state["last_render_s"] = time.perf_counter() - start
    if mask is not None and result is not None:
        legend = " ".join(
            f"<span style='color:rgb{viewer.label_colour(r['label'])}'>■</span> {r['name']}" for r in result.rows
        )
        st.markdown(legend, unsafe_allow_html=True)


def _results_section(result: RunResult, volume: Any) -> None:
    st.subheader("3. Results")
    started = st.session_state.pop("study_t0", None)  # set when the study was staged, in this run of the page
    if result.wait_s is None and started and started[0] == result.input_sha256:
        # the whole wait the user saw: staging, reading, the model (and its loading), drawing the views
        result.wait_s = time.perf_counter() - started[1]
    for w in result.prediction.warnings:  # e.g. NaN voxels set to 0: the reader must see it beside the numbers
        st.warning(w, icon="⚠️")
    table = [
        {"Label": r["label"], "Name": r["name"], "Volume (mL)": round(r["volume_ml"], 2), "Voxels": r["voxels"]}
        for r in result.rows
    ]
    st.dataframe(table, hide_index=True, key="volumes_table")
    sp = " × ".join(f"{s:.3g}" for s in volume.spacing)
    passes = result.prediction.passes
    st.caption(
        f"Model {result.model_name} (SHA-256 {result.model_sha256[:12]}…), input SHA-256 {result.input_sha256[:12]}…, "
        f"resunet {__version__}, model run {result.seconds:.1f} s"
        + (f" ({result.wait_s:.1f} s in all from the study's arrival to these views). " if result.wait_s else ". ")
        + (f"test-time augmentation on ({passes} mirrored passes). " if passes > 1
           else "test-time augmentation off (`resunet predict` mirrors by default, so its volumes can differ "
                "slightly). ")
        + f"Grid {volume.shape}, spacing {sp} mm."
    )


def _reference_section(cfg: AppConfig, staged: StagedStudy, volume: Any, result: RunResult, ws: SessionWorkspace) -> None:
    st.subheader("4. Compare with a reference mask (optional)")
    ref_file = st.file_uploader("Reference mask (NIfTI label map on the same grid)", key="reference")
    use_example = False
    if staged.path == cfg.example_study and cfg.example_reference.exists():
        use_example = st.checkbox("Use the example study's reference brain mask", key="use_example_ref")
    ref_path: Path | None = None
    ref_name = ""
    if ref_file is not None:
        name = ref_file.name.lower()
        if not (name.endswith(".nii") or name.endswith(".nii.gz")):
            st.error(f"{ref_file.name}: the reference must be a NIfTI label map (.nii or .nii.gz)", icon="⚠️")
            return
        if ref_file.size > cfg.max_upload_bytes:
            st.error(f"{ref_file.name}: above the upload limit of {cfg.max_upload_mb} MB", icon="⚠️")
            return
        ref_path = ws.subdir("reference") / ("reference.nii.gz" if name.endswith(".gz") else "reference.nii")
        ref_path.write_bytes(ref_file.getvalue())
        ref_name = ref_file.name
    elif use_example:
        ref_path, ref_name = cfg.example_reference, cfg.example_reference.name
    if ref_path is None:
        return
    resample = st.checkbox("If the grids differ, resample the prediction onto the reference (nearest neighbour)",
                           key="resample_pred")
    from resunet.webui.downloads import evaluation_outputs
    from resunet.io.hashing import sha256_file

    ev_key = (id(result), sha256_file(ref_path), resample)
    evaluations = _store("evaluations")
    if ev_key not in evaluations:
        evaluations.clear()
        model = st.session_state.get("model")
        try:
            with st.spinner("Computing the metrics and the report…"):
                evaluations[ev_key] = evaluation_outputs(
                    result, volume, ref_path, ws.path / "evaluation",
                    model_path=Path(model) if model else None,
                    tolerance_mm=cfg.tolerance_mm, resample_pred=resample, web_user=_web_user(),
                )
        except ResunetError as err:
            ev_dir = ws.path / "evaluation"
            msg = str(err).replace(str(ev_dir / "pred" / "study.nii.gz"), "(the page's mask)")
            msg = msg.replace(str(ref_path), ref_name)
            for suffix in (".nii.gz", ".nii"):
                msg = msg.replace(str(ev_dir / "gt" / f"study{suffix}"), ref_name)
            msg = msg.replace(str(ws.path), "…").replace(
                "pass --resample-pred (resample_pred=True)", "tick the resampling box above")
            st.error(msg, icon="⚠️")
            return
    rows, files = evaluations[ev_key]
    names = {r["label"]: r["name"] for r in result.rows}
    shown = []
    for r in rows:
        shown.append({
            "Label": r["label"], "Name": names.get(r["label"], str(r["label"])), "Situation": r["situation"],
            "Dice": r["dice"], "IoU": r["iou"], "Precision": r["precision"], "Recall": r["recall"],
            "HD95 (mm)": r["hd95"], "ASSD (mm)": r["assd"], f"NSD@{cfg.tolerance_mm:g}mm": r["nsd"],
            "Vol pred (mL)": r["vol_pred_ml"], "Vol ref (mL)": r["vol_gt_ml"],
        })
    from resunet.evaluation.definitions import IN_ONE_LINE

    tol = f"{cfg.tolerance_mm:g}"
    meaning = {"Dice": "dice", "IoU": "iou", "Precision": "precision", "Recall": "recall", "HD95 (mm)": "hd95",
               "ASSD (mm)": "assd", f"NSD@{tol}mm": "nsd"}
    help_of = {col: IN_ONE_LINE[key].format(t=tol) for col, key in meaning.items()}
    st.dataframe(shown, hide_index=True, key="metrics_table",
                 column_config={col: st.column_config.NumberColumn(col, help=text) for col, text in help_of.items()})
    # the abbreviations' meaning at hand, not only in the collapsed definitions below
    st.markdown("\n".join(f"- **{col.split(' (')[0]}**: {help_of[col]}" for col in
                          ("HD95 (mm)", "ASSD (mm)", f"NSD@{tol}mm")))
    st.caption("Computed by resunet.evaluation exactly as `resunet evaluate` does; empty cells are undefined "
               "values (see the conventions below), never counted as zero.")
    with st.expander("Empty-mask conventions and metric definitions"):
        st.markdown(_definitions_markdown())
    cols = st.columns(max(len(files), 1))
    for col, (fname, (data, mime)) in zip(cols, files.items()):
        with col:
            st.download_button(f"Download {fname}", data=data, file_name=fname, mime=mime, key=f"dl-{fname}")


def _definitions_markdown() -> str:
    from resunet.evaluation.definitions import DEFINITIONS

    lines = []
    for section, items in DEFINITIONS:
        if section.startswith(("Empty masks", "Overlap", "Surface distances")):
            lines.append(f"**{section}**")
            lines += [f"- **{term}**: {text}" for term, text in items]
    return "\n".join(lines)


def _downloads_section(staged: StagedStudy, volume: Any, result: RunResult, ws: SessionWorkspace) -> None:
    from resunet.webui.downloads import mask_files

    st.subheader("5. Download")
    try:
        files = mask_files(volume, result, ws.subdir("out"))
    except ResunetError as err:
        _show_error(err, staged)
        return
    cols = st.columns(max(len(files), 1))
    for col, (fname, (data, mime)) in zip(cols, files.items()):
        with col:
            st.download_button(f"Download {fname}", data=data, file_name=fname, mime=mime, key=f"dl-{fname}")
    _pacs_send(st.session_state["config"], staged, result)
    _audit(staged, result, ws)


def _audit(staged: StagedStudy, result: RunResult, ws: SessionWorkspace) -> None:
    """Record the prediction in the audit log once (after its mask files exist, so their hashes are kept)."""
    from resunet.webui.auth import web_user
    from resunet.webui.runner import record_prediction

    if result.audit_run_id is None:
        model = st.session_state.get("model")
        outputs = sorted(p for p in (ws.path / "out").glob("mask*") if p.is_file())
        try:
            result.audit_run_id = record_prediction(result, staged.path, Path(model), outputs, web_user())
        except ResunetError as err:
            st.warning(f"The audit log could not be written: {err}", icon="⚠️")
            return
    st.caption(f"Audit log: run {result.audit_run_id}")


# -- page ----------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="resunet", page_icon="🧠", layout="wide")
    if not require_login():
        return
    try:
        cfg = _config()
    except ResunetError as err:
        st.error(f"Server configuration: {err}", icon="⚠️")
        return
    ws = _workspace(cfg)
    _heartbeat(cfg, ws)
    with ws.running():
        _page(cfg, ws)


def _page(cfg: AppConfig, ws: SessionWorkspace) -> None:
    st.title("resunet")
    st.caption("Residual U-Net segmentation. Research software: not a medical device; check every result.")
    if st.session_state.pop("expired_notice", False):
        st.info("Your previous session expired; its uploads and results were deleted.")
    model = _model_section(cfg)
    try:
        if cfg.service_url:  # the service's held results (resunet.webui.review_queue)
            from resunet.webui.review_queue import review_section

            review_section(cfg, ws, _web_user())
        _input_section(cfg, ws)
        _study_sections(cfg, ws, model)
    except Exception as err:  # noqa: BLE001 - a bug must not take the page down; library errors are handled inside
        _unexpected(err, "showing the study")


def _unexpected(err: BaseException, what: str) -> None:
    """An error that is not a ResunetError: a bug. Generic message on the page, details in the server log."""
    log.error("unexpected %s while %s", type(err).__name__, what, exc_info=err)
    st.error(f"Unexpected error while {what} ({type(err).__name__}). The page keeps working for the next study; "
             "the details are in the server log. Please report it.", icon="⚠️")


def _study_sections(cfg: AppConfig, ws: SessionWorkspace, model: ModelInfo | None) -> None:
    staged: StagedStudy | None = st.session_state.get("study")
    if staged is None:
        if not st.session_state.get("study_error"):  # the red error above says what to do instead
            st.info("Upload a study or click **Example study** to start.")
        return
    uid, ok = _pick_series(staged)
    if not ok:
        return
    try:
        volume = _load_volume(staged, uid)
    except ResunetError as err:
        _show_error(err, staged)
        return
    st.caption(f"**{staged.label}**: {volume.shape[0]}×{volume.shape[1]}×{volume.shape[2]} voxels, "
               f"{modality_text(volume.meta.get('modality'), model)}, orientation {volume.orientation}")
    _patient_panel(volume)
    result = None
    if model is not None:
        st.subheader("2. Segmentation")
        result = _run(cfg, staged, uid, volume, model)
    _viewer_section(staged, uid, volume, result)
    if result is None:
        return
    _results_section(result, volume)
    _reference_section(cfg, staged, volume, result, ws)
    _downloads_section(staged, volume, result, ws)
    from resunet.webui.edit_panel import edit_section  # issue 21: editor, comparison, approve/reject

    edit_section(staged, volume, result, ws, _web_user(), st.session_state.get("model"))


def _patient_panel(volume: Any) -> None:
    """Patient identifiers from the DICOM header: shown on the page only, never logged."""
    ds_list = volume.meta.get("dicom_datasets") or []
    ds = ds_list[0] if ds_list else None
    if ds is None:
        files = volume.meta.get("dicom_files") or []
        if files and Path(files[0]).exists():
            import pydicom

            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            except Exception:  # header display is best effort; reading already succeeded
                ds = None
    if ds is None:
        return
    fields = {k: str(getattr(ds, k, "") or "") for k in ("PatientName", "PatientID", "StudyDate", "StudyDescription")}
    if any(fields.values()):
        with st.expander("Patient and study (from the DICOM header)"):
            st.table({k: [v] for k, v in fields.items()})


main()
