"""Display rendering for the web UI: slices, physical aspect ratio, orientation labels, window/level,
mask overlay. Display only: nothing here changes a number the user downloads.

Orientation. A :class:`DisplayVolume` is the scan put on its closest-to-RAS voxel grid with
:func:`resunet.preprocess.reorientation` (an exact axis permutation/flip, no interpolation), so its
array is indexed ``[x, y, z]`` with x growing towards the patient's Right, y towards Anterior and z
towards Superior. Oblique scans are shown on their nearest axes (as most PACS viewers do); the
exact oblique geometry stays in the Volume that is predicted on and downloaded.

Screen convention (radiological): axial and coronal views show the patient's right on the screen's
left; axial has anterior at the top, coronal and sagittal have superior at the top; sagittal has
anterior on the left. Every view's 2D image is therefore ``slice.T[::-1, ::-1]``.

Why numpy + PIL rather than matplotlib: a slider move re-renders three views; building a matplotlib
figure costs ~100 ms each, slicing + a PIL resize costs ~1-5 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from nibabel import orientations as nio
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from resunet.io.dicom_codes import LABEL_COLOURS as _DICOM_LABEL_COLOURS
from resunet.io.dicom_codes import label_colour as _dicom_label_colour
from resunet.io.volume import Volume
from resunet.preprocess import reorientation

#: The three views, in the order shown on the page.
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")

#: Which display axis (0=x R, 1=y A, 2=z S) each view slices through.
VIEW_AXIS: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}

#: Orientation letters at (left, right, top, bottom) of each view, radiological convention.
VIEW_LABELS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}

#: Window/level presets as (width, level), in the scan's units (HU for CT).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "CT brain": (80.0, 40.0),
    "CT soft tissue": (400.0, 40.0),
    "CT lung": (1500.0, -600.0),
    "CT bone": (1800.0, 400.0),
}
#: Name of the data-driven preset (0.5th to 99.5th percentile of non-zero voxels).
AUTO_PRESET = "Auto (percentiles)"

#: Label colours (RGB), label 1 first; repeats after the last: the DICOM outputs' colours (RTSTRUCT
#: ROIDisplayColor, SEG RecommendedDisplayCIELabValue), so a structure looks the same in every viewer
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = _DICOM_LABEL_COLOURS
UNCERTAINTY_COLOUR = (255, 255, 0)


def label_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of a label value (``label >= 1``): :func:`resunet.io.dicom_codes.label_colour`."""
    return _dicom_label_colour(label)


@dataclass
class DisplayVolume:
    """A volume on its closest-to-RAS grid, for display.

    Attributes:
        array: shape ``(X, Y, Z)``, x towards Right, y towards Anterior, z towards Superior.
        spacing: voxel size in mm along x, y, z.
        oblique: True when the source axes are not aligned with the patient axes (shown on the
            nearest axes).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    oblique: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def n_slices(self, view: str) -> int:
        """Number of slices of ``view``."""
        return self.shape[VIEW_AXIS[view]]

    def slice2d(self, view: str, index: int) -> np.ndarray:
        """The 2D screen image of slice ``index`` of ``view`` (rows top->bottom, columns left->right)."""
        axis = VIEW_AXIS[view]
        index = int(np.clip(index, 0, self.shape[axis] - 1))
        # basic indexing gives a view (np.take would first copy the whole, possibly non-contiguous, volume)
        sl = self.array[(slice(None),) * axis + (index,)]
        return sl.T[::-1, ::-1]

    def pixel_mm(self, view: str) -> tuple[float, float]:
        """(row height, column width) in mm of the screen image of ``view``."""
        axes = [a for a in range(3) if a != VIEW_AXIS[view]]
        # slice2d transposes: rows follow the second remaining axis, columns the first
        return self.spacing[axes[1]], self.spacing[axes[0]]


def to_display(volume: Volume) -> DisplayVolume:
    """Put ``volume`` on its closest-to-RAS grid (exact permutation/flip; no interpolation)."""
    ornt, _shape, new_affine = reorientation(volume.affine, volume.shape)
    arr = nio.apply_orientation(np.asarray(volume.array), ornt)
    spacing = tuple(float(s) for s in np.linalg.norm(new_affine[:3, :3], axis=0))
    direction = new_affine[:3, :3] / np.asarray(spacing)
    oblique = not np.allclose(np.abs(direction), np.eye(3), atol=1e-3)
    # a view of the source array (axis flips/permutation only): no copy of a possibly GB-sized scan
    return DisplayVolume(array=arr, spacing=spacing, oblique=oblique)  # type: ignore[arg-type]


def auto_window(array: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """(width, level) spanning the ``lo_pct``..``hi_pct`` percentiles of the non-zero voxels.

    Uses a strided subsample of at most ~1M voxels: percentiles for display, not for measurement.
    """
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // 1_000_000)
    sample = flat[::step].astype(np.float32)
    nz = sample[sample != 0]
    if nz.size:
        sample = nz
    lo, hi = np.percentile(sample, [lo_pct, hi_pct]) if sample.size else (0.0, 1.0)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + 1.0
    return hi - lo, (hi + lo) / 2.0


def apply_window(image: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map intensities to uint8 grey: ``level - width/2`` -> 0, ``level + width/2`` -> 255."""
    width = max(float(width), 1e-6)
    lo = level - width / 2.0
    out = (image.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(out, 0, 255).astype(np.uint8)


def display_size(shape: tuple[int, int], pixel_mm: tuple[float, float], mm_to_px: float) -> tuple[int, int]:
    """(width, height) in screen pixels of an image of ``shape`` (rows, cols) with square mm."""
    h = max(1, int(round(shape[0] * pixel_mm[0] * mm_to_px)))
    w = max(1, int(round(shape[1] * pixel_mm[1] * mm_to_px)))
    return w, h


def scale_for(volume: DisplayVolume, box_px: int = 420) -> float:
    """mm -> screen pixel factor so that the largest field of view fits ``box_px`` (same for all views)."""
    fov = max(n * s for n, s in zip(volume.shape, volume.spacing))
    return box_px / max(fov, 1e-6)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _draw_orientation(img: Image.Image, labels: Sequence[str]) -> None:
    draw = ImageDraw.Draw(img)
    size = max(12, min(img.size) // 22)
    font = _font(size)
    w, h = img.size
    pad = 4
    left, right, top, bottom = labels
    spots = {
        left: (pad, h / 2, "lm"),
        right: (w - pad, h / 2, "rm"),
        top: (w / 2, pad, "mt"),
        bottom: (w / 2, h - pad, "mb"),
    }
    for text, (x, y, anchor) in spots.items():
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def render_slice(
    image: DisplayVolume,
    view: str,
    index: int,
    *,
    window: tuple[float, float],
    mask: DisplayVolume | None = None,
    opacity: float = 0.4,
    outline: bool = True,
    labels_shown: Sequence[int] | None = None,
    uncertainty: DisplayVolume | None = None,
    uncertainty_max: float | None = None,
    uncertainty_opacity: float = 0.6,
    mm_to_px: float | None = None,
    orientation_labels: bool = True,
) -> Image.Image:
    """One view as an RGB PIL image at physical aspect ratio.

    Args:
        image: the scan on the display grid.
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: slice index along the view's axis (clipped to range).
        window: ``(width, level)`` in the scan's intensity units.
        mask: integer label map on the same display grid, or None.
        opacity: fill opacity of the labels, 0..1 (0 = outlines only).
        outline: draw each label's boundary at full opacity.
        labels_shown: label values to draw (default: all non-zero values in the slice).
        uncertainty: non-negative per-voxel uncertainty on the same grid, or None.
        uncertainty_max: value shown at full uncertainty colour (default: the slice maximum).
        uncertainty_opacity: opacity of the uncertainty at ``uncertainty_max``.
        mm_to_px: screen pixels per mm (default :func:`scale_for`).
        orientation_labels: draw R/L, A/P, S/I letters at the edges.
    """
    scale = mm_to_px if mm_to_px is not None else scale_for(image)
    grey = apply_window(image.slice2d(view, index), *window)
    size = display_size(grey.shape, image.pixel_mm(view), scale)
    base = Image.fromarray(grey, mode="L").resize(size, Image.Resampling.BILINEAR)
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32)

    if uncertainty is not None:
        u = uncertainty.slice2d(view, index).astype(np.float32)
        umax = float(uncertainty_max) if uncertainty_max else float(u.max())
        if umax > 0:
            u_img = Image.fromarray(np.clip(u / umax, 0, 1).astype(np.float32), mode="F").resize(
                size, Image.Resampling.BILINEAR
            )
            a = np.asarray(u_img, dtype=np.float32)[..., None] * float(uncertainty_opacity)
            rgb = rgb * (1 - a) + np.asarray(UNCERTAINTY_COLOUR, np.float32) * a

    if mask is not None:
        lab2d = mask.slice2d(view, index)
        present = [int(v) for v in np.unique(lab2d) if v != 0]
        if labels_shown is not None:
            keep = set(int(x) for x in labels_shown)
            present = [v for v in present if v in keep]
        if present:
            # nearest-neighbour upsampling keeps labels as labels; int32 'I' mode handles any value
            lab = np.asarray(
                Image.fromarray(np.ascontiguousarray(lab2d).astype(np.int32), mode="I").resize(
                    size, Image.Resampling.NEAREST
                )
            )
            edges = find_boundaries(lab, mode="inner") if outline else None
            for v in present:
                colour = np.asarray(label_colour(v), np.float32)
                sel = lab == v
                if opacity > 0:
                    rgb[sel] = rgb[sel] * (1 - opacity) + colour * opacity
                if edges is not None:
                    rgb[sel & edges] = colour

    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    if orientation_labels:
        _draw_orientation(img, VIEW_LABELS[view])
    return img
