"""Mask editing for the web page's review (issue 21 point 1): brush, fill/delete, undo/redo, interpolation.

Pure numpy/scipy/skimage; no Streamlit. A :class:`MaskEditor` owns a copy of the model's mask (the
*corrected* mask) and edits it through the SAME display geometry the viewer draws with
(:func:`resunet.webui.viewer.to_display`, :meth:`~resunet.webui.viewer.DisplayVolume.slice2d`,
:func:`~resunet.webui.viewer.display_size`, :func:`~resunet.webui.viewer.scale_for`). The display
array is a view (axis flips/permutation) of the corrected array, and so is each 2D slice, so an edit
written into a slice lands on the source voxels: exact for anisotropic spacing and for flipped or
permuted affines; oblique scans are edited on the nearest axes they are shown on.

Screen coordinates are those of the rendered slice image (:func:`~resunet.webui.viewer.render_slice`):
``(x, y)`` in image pixels, x to the right, y downwards, origin at the image's top-left corner (pixel
``(0, 0)`` covers ``[0, 1) x [0, 1)``). They are mapped to continuous slice coordinates through the
resize factor of the image, and brush distances are measured in mm with the slice's pixel size.

History keeps diffs (the changed pixels' positions, old and new values), not whole volumes, and is
bounded (``history`` steps).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from skimage.segmentation import flood

from resunet.errors import InputError
from resunet.io.volume import Volume
from resunet.webui.viewer import VIEWS, DisplayVolume, display_size, scale_for, to_display

#: Editing tools offered on the page.
TOOLS: tuple[str, ...] = ("paint", "erase", "fill", "delete")


@dataclass
class _SliceDiff:
    """Pixels changed on one screen slice: positions (rows, cols), values before and after."""

    view: str
    index: int
    rows: np.ndarray
    cols: np.ndarray
    old: np.ndarray
    new: np.ndarray


@dataclass
class _Edit:
    """One user action (a stroke, a fill, an interpolation): the diffs of every slice it touched."""

    name: str
    diffs: list[_SliceDiff] = field(default_factory=list)
    #: (view, label, slice index) marked as edited by this action
    marks: list[tuple[str, int, int]] = field(default_factory=list)


class MaskEditor:
    """Edits a corrected copy of a model's mask through the viewer's display geometry.

    Args:
        model_mask: the model's label map (integer values, 0 = background); it is not changed.
        mm_to_px: screen pixels per mm of the rendered slices (default
            :func:`~resunet.webui.viewer.scale_for` of the display volume, as the page draws).
        history: number of undo steps kept (older ones are dropped).
    """

    def __init__(self, model_mask: Volume, mm_to_px: float | None = None, history: int = 50) -> None:
        arr = np.asarray(model_mask.array)
        if arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise InputError(f"the mask to edit must be a 3D integer label map, got shape {arr.shape} of {arr.dtype}")
        dtype = np.uint8 if arr.dtype == bool else arr.dtype
        self.model_mask = model_mask
        self.corrected = Volume(np.array(arr, dtype=dtype, copy=True), np.array(model_mask.affine, dtype=float),
                                dict(model_mask.meta))
        self.display: DisplayVolume = to_display(self.corrected)
        if not np.shares_memory(self.display.array, self.corrected.array):  # pragma: no cover - nibabel contract
            raise RuntimeError("the display grid is not a view of the corrected mask")
        self.mm_to_px = float(mm_to_px) if mm_to_px is not None else scale_for(self.display)
        self._undo: deque[_Edit] = deque(maxlen=max(1, int(history)))
        self._redo: list[_Edit] = []
        self._edited: dict[tuple[str, int], dict[int, int]] = {}
        self._revision = 0

    # --- geometry ---------------------------------------------------------------------------------------

    def _check_view(self, view: str) -> None:
        if view not in VIEWS:
            raise InputError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")

    def _slice(self, view: str, index: int) -> np.ndarray:
        """The writable 2D screen slice (a view of the corrected array)."""
        self._check_view(view)
        n = self.display.n_slices(view)
        if not 0 <= int(index) < n:
            raise InputError(f"slice {index} is outside the {view} view (0..{n - 1})")
        return self.display.slice2d(view, int(index))

    def image_size(self, view: str) -> tuple[int, int]:
        """(width, height) in screen pixels of a rendered slice of ``view`` (as render_slice draws it)."""
        self._check_view(view)
        shape = self.display.slice2d(view, 0).shape
        return display_size(shape, self.display.pixel_mm(view), self.mm_to_px)

    def to_slice(self, view: str, point: Sequence[float]) -> tuple[float, float]:
        """Screen point ``(x, y)`` (image pixels) -> continuous slice coordinates ``(row, col)``.

        Pixel centres of the slice are at integer ``(row, col)``; the image was resized from the
        slice by (width/cols, height/rows), so the mapping is the inverse of that resize.
        """
        self._check_view(view)
        rows, cols = self.display.slice2d(view, 0).shape
        w, h = self.image_size(view)
        x, y = float(point[0]), float(point[1])
        return y * rows / h - 0.5, x * cols / w - 0.5

    def voxel_at(self, view: str, index: int, point: Sequence[float]) -> tuple[int, int, int]:
        """Source voxel index ``(i, j, k)`` of the corrected mask under a screen point of a slice."""
        self._slice(view, index)  # checks the view and the index
        rows, cols = self.display.slice2d(view, 0).shape
        r, c = self.to_slice(view, point)
        ri, ci = int(np.clip(np.floor(r + 0.5), 0, rows - 1)), int(np.clip(np.floor(c + 0.5), 0, cols - 1))
        probe = np.zeros(self.corrected.shape, dtype=bool)
        # the same view chain the edits use, applied to a probe: no second statement of the geometry
        to_display(Volume(probe, self.corrected.affine)).slice2d(view, index)[ri, ci] = True
        return tuple(int(v[0]) for v in np.nonzero(probe))  # type: ignore[return-value]

    # --- edits --------------------------------------------------------------------------------------------

    def _apply(self, edit: _Edit, view: str, index: int, sel: np.ndarray, value: np.ndarray | int) -> None:
        """Write ``value`` at the selected pixels of one slice, recording the diff."""
        sl = self._slice(view, index)
        rows, cols = np.nonzero(sel)
        if rows.size == 0:
            return
        old = sl[rows, cols].copy()
        new = np.broadcast_to(np.asarray(value, dtype=sl.dtype), old.shape).copy()
        changed = old != new
        if not changed.any():
            return
        rows, cols, old, new = rows[changed], cols[changed], old[changed], new[changed]
        sl[rows, cols] = new
        edit.diffs.append(_SliceDiff(view, int(index), rows, cols, old, new))

    def _commit(self, edit: _Edit) -> bool:
        if not edit.diffs:
            return False
        for view, label, index in edit.marks:
            marks = self._edited.setdefault((view, label), {})
            marks[index] = marks.get(index, 0) + 1
        self._undo.append(edit)
        self._redo.clear()
        self._revision += 1
        return True

    def _check_label(self, label: int) -> int:
        label = int(label)
        info = np.iinfo(self.corrected.array.dtype)
        if not 1 <= label <= info.max:
            raise InputError(f"label {label} cannot be drawn: use a label value from 1 to {info.max}")
        return label

    def brush(self, view: str, index: int, stroke: Sequence[Sequence[float]], radius_mm: float, label: int,
              erase: bool = False) -> bool:
        """Paint (or erase) ``label`` along a stroke on slice ``index`` of ``view``.

        Args:
            stroke: screen points ``(x, y)`` in image pixels, in drawing order (one point = a dab).
            radius_mm: brush radius in mm, measured on the slice with its pixel size (so a round
                brush stays round on anisotropic pixels). The pixel under each point is always hit.
            label: label value painted (or, with ``erase``, the only value cleared to 0).
        Returns:
            True when a voxel changed (an undo step was recorded).
        """
        label = self._check_label(label)
        if radius_mm < 0:
            raise InputError(f"brush radius must be >= 0 mm, got {radius_mm}")
        pts = np.asarray([self.to_slice(view, p) for p in stroke], dtype=float)
        if pts.size == 0:
            return False
        sl = self._slice(view, index)
        row_mm, col_mm = self.display.pixel_mm(view)
        # hand-written capsule distance: skimage.draw has no thick polyline in anisotropic mm
        pad_r, pad_c = radius_mm / row_mm + 1, radius_mm / col_mm + 1
        r0 = int(max(0, np.floor(pts[:, 0].min() - pad_r)))
        r1 = int(min(sl.shape[0], np.ceil(pts[:, 0].max() + pad_r) + 1))
        c0 = int(max(0, np.floor(pts[:, 1].min() - pad_c)))
        c1 = int(min(sl.shape[1], np.ceil(pts[:, 1].max() + pad_c) + 1))
        sel = np.zeros(sl.shape, dtype=bool)
        if r1 > r0 and c1 > c0:
            rr, cc = np.mgrid[r0:r1, c0:c1]
            py, px = rr * row_mm, cc * col_mm
            ends = np.vstack([pts, pts[-1:]]) if len(pts) == 1 else pts
            best = np.full(py.shape, np.inf)
            for (ay, ax), (by, bx) in zip(ends[:-1], ends[1:]):
                ay, ax, by, bx = ay * row_mm, ax * col_mm, by * row_mm, bx * col_mm
                dy, dx = by - ay, bx - ax
                den = dy * dy + dx * dx
                t = np.zeros(py.shape) if den == 0 else np.clip(((py - ay) * dy + (px - ax) * dx) / den, 0, 1)
                best = np.minimum(best, np.hypot(py - (ay + t * dy), px - (ax + t * dx)))
            sel[r0:r1, c0:c1] = best <= radius_mm
        for r, c in pts:  # the pixel under each point, whatever the radius
            ri, ci = int(np.floor(r + 0.5)), int(np.floor(c + 0.5))
            if 0 <= ri < sl.shape[0] and 0 <= ci < sl.shape[1]:
                sel[ri, ci] = True
        edit = _Edit("erase" if erase else "paint", marks=[(view, label, int(index))])
        if erase:
            self._apply(edit, view, index, sel & (sl == label), 0)
        else:
            self._apply(edit, view, index, sel, label)
        return self._commit(edit)

    def _pixel(self, view: str, index: int, point: Sequence[float]) -> tuple[int, int] | None:
        sl = self._slice(view, index)
        r, c = self.to_slice(view, point)
        ri, ci = int(np.floor(r + 0.5)), int(np.floor(c + 0.5))
        if 0 <= ri < sl.shape[0] and 0 <= ci < sl.shape[1]:
            return ri, ci
        return None

    def fill(self, view: str, index: int, point: Sequence[float], label: int) -> bool:
        """Give ``label`` to the 2D connected region (4-connected, same value) under a click."""
        label = self._check_label(label)
        hit = self._pixel(view, index, point)
        if hit is None:
            return False
        sl = self._slice(view, index)
        region = flood(np.ascontiguousarray(sl), hit, connectivity=1)
        edit = _Edit("fill", marks=[(view, label, int(index))])
        self._apply(edit, view, index, region, label)
        return self._commit(edit)

    def delete(self, view: str, index: int, point: Sequence[float]) -> bool:
        """Clear (to 0) the 2D connected component (8-connected) of the label under a click."""
        hit = self._pixel(view, index, point)
        if hit is None:
            return False
        sl = self._slice(view, index)
        value = int(sl[hit])
        if value == 0:
            return False
        components, _n = ndimage.label(sl == value, structure=np.ones((3, 3), dtype=bool))
        edit = _Edit("delete", marks=[(view, value, int(index))])
        self._apply(edit, view, index, components == components[hit], 0)
        return self._commit(edit)

    def edited_slices(self, view: str, label: int) -> list[int]:
        """Slice indices of ``view`` where ``label`` was edited (and the edit is not undone)."""
        return sorted(i for i, n in self._edited.get((view, int(label)), {}).items() if n > 0)

    def interpolate(self, view: str, label: int, slices: Iterable[int] | None = None) -> bool:
        """Fill the slices between edited slices of ``label`` by shape-based interpolation.

        Each pair of consecutive edited slices ``a < b`` (default :meth:`edited_slices`) with the label
        present on both gets, on every slice between them, the zero level of the linear blend of the two
        signed distance maps (in mm, ``scipy.ndimage.distance_transform_edt`` with the slice's pixel
        size), as ITK-SNAP and 3D Slicer's "fill between slices" do. On those slices the label's pixels
        become exactly the interpolated shape (other labels are overwritten where the shape covers them).
        """
        label = self._check_label(label)
        self._check_view(view)
        keys = sorted(set(int(i) for i in (slices if slices is not None else self.edited_slices(view, label))))
        sampling = self.display.pixel_mm(view)
        edit = _Edit("interpolate")
        for a, b in zip(keys[:-1], keys[1:]):
            if b - a < 2:
                continue
            ma, mb = self._slice(view, a) == label, self._slice(view, b) == label
            if not ma.any() or not mb.any():
                continue
            da, db = _signed_distance(ma, sampling), _signed_distance(mb, sampling)
            for k in range(a + 1, b):
                t = (k - a) / (b - a)
                inside = (1 - t) * da + t * db < 0
                sl = self._slice(view, k)
                self._apply(edit, view, k, (sl == label) & ~inside, 0)
                self._apply(edit, view, k, inside, label)
        return self._commit(edit)

    # --- history ------------------------------------------------------------------------------------------

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def _replay(self, edit: _Edit, backwards: bool) -> None:
        diffs = reversed(edit.diffs) if backwards else edit.diffs
        for d in diffs:
            self._slice(d.view, d.index)[d.rows, d.cols] = d.old if backwards else d.new
        for view, label, index in edit.marks:
            marks = self._edited.setdefault((view, label), {})
            marks[index] = marks.get(index, 0) + (-1 if backwards else 1)
        self._revision += 1

    def undo(self) -> bool:
        """Revert the last edit exactly; False when there is nothing to undo."""
        if not self._undo:
            return False
        edit = self._undo.pop()
        self._replay(edit, backwards=True)
        self._redo.append(edit)
        return True

    def redo(self) -> bool:
        """Re-apply the last undone edit exactly; False when there is nothing to redo."""
        if not self._redo:
            return False
        edit = self._redo.pop()
        self._replay(edit, backwards=False)
        self._undo.append(edit)
        return True

    @property
    def revision(self) -> int:
        """A number that changes with every edit, undo and redo (the canvas redraws when it changes)."""
        return self._revision

    def voxels_changed(self) -> int:
        """Number of voxels where the corrected mask differs from the model's."""
        return int(np.count_nonzero(self.corrected.array != np.asarray(self.model_mask.array)))


def _signed_distance(mask: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm) of a 2D mask: negative inside, positive outside, never 0 on a pixel."""
    if mask.all():
        return np.full(mask.shape, -1e9)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    return outside - inside
