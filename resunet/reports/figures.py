"""Report figures (matplotlib ``Figure`` objects, no pyplot state, so any backend and any thread is fine).

- :func:`label_figure`: per label, Dice and HD95 box + strip plots, predicted vs reference volume, and
  a Bland-Altman plot of the volumes.
- :func:`case_slice_figure`: one slice of a case: image, reference overlay, prediction overlay.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from resunet.io.volume import Volume

REF_COLOR = "#1a9850"  # green
PRED_COLOR = "#d73027"  # red


def figure_png_base64(fig: Figure, dpi: int = 90) -> str:
    """PNG bytes of ``fig`` as base64 text (for ``data:image/png;base64,...``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _box_strip(ax, values: list[float], title: str, unit: str, n_undefined: int) -> None:
    ax.set_title(title + (f"\n({n_undefined} undefined, not shown)" if n_undefined else ""), fontsize=9)
    if not values:
        ax.text(0.5, 0.5, "no defined values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    ax.boxplot([values], widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(values))  # fixed seed: same picture each run
    ax.scatter(1 + jitter, values, s=10, alpha=0.7, color="#4575b4", zorder=3)
    ax.set_xticks([1], [f"n = {len(values)}"])
    ax.set_ylabel(unit)


def label_figure(rows: Sequence[Mapping[str, Any]], label: int, name: str = "") -> Figure:
    """Four panels for one label over all cases: Dice, HD95 (mm), volume scatter (mL), Bland-Altman (mL)."""
    fig = Figure(figsize=(13, 3.4))
    axes = fig.subplots(1, 4)
    title = f"label {label}" + (f" ({name})" if name else "")
    fig.suptitle(title, fontsize=11)
    dice = [r["dice"] for r in rows if r["dice"] is not None]
    hd = [r["hd95"] for r in rows if r["hd95"] is not None]
    _box_strip(axes[0], dice, "Dice", "Dice", len(rows) - len(dice))
    _box_strip(axes[1], hd, "HD95", "mm", len(rows) - len(hd))
    vp = np.array([r["vol_pred_ml"] for r in rows], dtype=float)
    vg = np.array([r["vol_gt_ml"] for r in rows], dtype=float)
    ax = axes[2]
    ax.scatter(vg, vp, s=12, color="#4575b4")
    hi = float(max(vp.max(initial=0), vg.max(initial=0))) * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="identity")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("reference volume (mL)")
    ax.set_ylabel("predicted volume (mL)")
    ax.set_title("predicted vs reference volume", fontsize=9)
    ax = axes[3]
    mean, diff = (vp + vg) / 2, vp - vg
    ax.scatter(mean, diff, s=12, color="#4575b4")
    ax.axhline(0, color="grey", lw=0.8)
    if diff.size >= 2:
        bias, sd = float(diff.mean()), float(diff.std(ddof=1))
        ax.axhline(bias, color="black", lw=1, label=f"bias {bias:.3g} mL")
        for lim in (bias - 1.96 * sd, bias + 1.96 * sd):
            ax.axhline(lim, color="black", lw=1, ls=":")
        ax.set_title(f"Bland-Altman: bias {bias:.3g} mL\nlimits of agreement ±{1.96 * sd:.3g} mL", fontsize=9)
    else:
        ax.set_title("Bland-Altman (needs 2 cases)", fontsize=9)
    ax.set_xlabel("mean of volumes (mL)")
    ax.set_ylabel("predicted − reference (mL)")
    fig.tight_layout()
    return fig


#: The web page's screen convention (radiological, app/viewer.py), so a report slice reads like the page:
#: per patient (RAS) axis sliced through, the view's name and the letters at its (left, right, top, bottom)
#: edges; the slice of the RAS-ordered array is shown as ``slice.T[::-1, ::-1]``.
VIEWS: dict[int, tuple[str, tuple[str, str, str, str]]] = {
    2: ("axial", ("R", "L", "A", "P")),
    1: ("coronal", ("R", "L", "S", "I")),
    0: ("sagittal", ("A", "P", "S", "I")),
}


def _slice_axis_and_index(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[int, int]:
    """Slice across the axis with the largest spacing (the last on ties), where the masks disagree most."""
    if 1 in pred.shape:  # a 2D image stored as (I, J, 1): show its plane
        return pred.shape.index(1), 0
    sp = np.asarray(spacing)
    axis = int(np.flatnonzero(sp == sp.max())[-1])
    others = tuple(a for a in range(3) if a != axis)
    score = np.count_nonzero(pred ^ ref, axis=others)
    if not score.any():
        score = np.count_nonzero(pred | ref, axis=others)
    return axis, int(np.argmax(score))


def case_slice_figure(
    case: str, label: int, pred: Volume, ref: Volume, image: Volume | None = None, row: Mapping[str, Any] | None = None
) -> Figure:
    """Image, reference (green) and prediction (red, reference contour dashed) on one slice.

    The volumes are put on their closest patient (RAS) axes (an exact permutation/flip of the voxels,
    nibabel's ``io_orientation``) and shown as the web page shows them: radiological convention, the
    patient's right on the left, R/L, A/P, S/I letters at the edges. The slice is across the axis with
    the largest spacing, at the index where prediction and reference disagree most; ``image`` must be
    on ``ref``'s grid.
    """
    from nibabel import orientations as nio

    ornt = nio.io_orientation(ref.affine)
    ras_spacing = [0.0, 0.0, 0.0]
    for src, (dst, _flip) in enumerate(ornt):
        ras_spacing[int(dst)] = float(ref.spacing[src])

    def ras(a: np.ndarray) -> np.ndarray:
        return nio.apply_orientation(a, ornt)

    p = ras(np.asarray(pred.array) == label)
    r = ras(np.asarray(ref.array) == label)
    axis, idx = _slice_axis_and_index(p, r, ras_spacing)
    others = [a for a in range(3) if a != axis]
    # screen rows follow the second remaining axis, columns the first (slice.T)
    aspect = ras_spacing[others[1]] / ras_spacing[others[0]]
    view, letters = VIEWS[axis]

    def take(a: np.ndarray) -> np.ndarray:
        return np.take(a, idx, axis=axis).T[::-1, ::-1]

    ps, rs = take(p), take(r)
    img = take(ras(np.asarray(image.array, dtype=np.float32))) if image is not None else None
    src_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    voxel = idx if ornt[src_axis, 1] > 0 else p.shape[axis] - 1 - idx
    fig = Figure(figsize=(10, 3.6))
    axs = fig.subplots(1, 3)
    desc = f"case {case}, label {label}, {view} slice {idx + 1} of {p.shape[axis]} (voxel {'ijk'[src_axis]} = {voxel})"
    if row is not None and row.get("dice") is not None:
        hd = row.get("hd95")
        desc += f": Dice {row['dice']:.3f}, HD95 " + (f"{hd:.2f} mm" if hd is not None else "undefined")
    fig.suptitle(desc, fontsize=10)
    if img is not None:
        lo, hi = np.percentile(img, [1, 99])
        bg = dict(cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    else:
        img = np.zeros_like(ps, dtype=np.float32)
        bg = dict(cmap="gray", vmin=0, vmax=1)
    titles = ["image" if image is not None else "no image (give --images or --predictions)", "reference", "prediction"]
    spots = [(0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"), (0.5, 0.98, "center", "top"),
             (0.5, 0.02, "center", "bottom")]
    for ax, t in zip(axs, titles):
        ax.imshow(img, origin="upper", aspect=aspect, interpolation="nearest", **bg)
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for letter, (x, y, ha, va) in zip(letters, spots):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9,
                    fontweight="bold", bbox=dict(boxstyle="square,pad=0.1", fc="black", ec="none", alpha=0.6))
    _overlay(axs[1], rs, REF_COLOR, aspect)
    _overlay(axs[2], ps, PRED_COLOR, aspect)
    if rs.any():
        axs[2].contour(rs.astype(float), levels=[0.5], colors=[REF_COLOR], linewidths=1, linestyles="--")
    fig.tight_layout()
    return fig


def _overlay(ax, mask: np.ndarray, color: str, aspect: float) -> None:
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = to_rgba(color, alpha=0.45)
    ax.imshow(rgba, origin="upper", aspect=aspect, interpolation="nearest")
    if mask.any() and min(mask.shape) > 1:
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1)
