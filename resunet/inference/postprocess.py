"""Post-processing of a label map: keep the largest component, remove islands, fill holes.

Runs on the final label map on the input grid (after :func:`resunet.preprocess.restore` and the
argmax), so "largest component" and "island size" refer to what the user sees. Connected components
use face connectivity (6-neighbourhood in 3D, scipy's default structure), like nnU-Net.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from resunet.errors import ConfigError


@dataclass
class PostProcess:
    """What to do to each foreground label after the argmax.

    Args:
        largest_component: keep only the largest connected component of each label.
        fill_holes: fill holes of each label (only background voxels are filled; another label
            inside a hole is kept).
        min_island_voxels: remove connected components smaller than this many voxels (0: off).
            Ignored when ``largest_component`` is set (one component remains anyway).
    """

    largest_component: bool = False
    fill_holes: bool = False
    min_island_voxels: int = 0

    def __post_init__(self) -> None:
        if int(self.min_island_voxels) < 0:
            raise ConfigError(f"min_island_voxels must be >= 0, got {self.min_island_voxels}")
        self.min_island_voxels = int(self.min_island_voxels)

    @property
    def active(self) -> bool:
        return bool(self.largest_component or self.fill_holes or self.min_island_voxels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PostProcess":
        d = dict(d or {})
        unknown = set(d) - {"largest_component", "fill_holes", "min_island_voxels"}
        if unknown:
            raise ConfigError(f"unknown post-processing keys {sorted(unknown)}")
        return cls(
            largest_component=bool(d.get("largest_component", False)),
            fill_holes=bool(d.get("fill_holes", False)),
            min_island_voxels=int(d.get("min_island_voxels", 0) or 0),
        )

    def apply(self, labels: np.ndarray, label_values: list[int] | None = None) -> np.ndarray:
        """Post-process an integer label map ``(I, J, K)`` in place and return it.

        Args:
            labels: label map; 0 is background.
            label_values: the foreground labels to process (default: every non-zero value present).
        """
        if not self.active:
            return labels
        if labels.flags.f_contiguous and not labels.flags.c_contiguous:
            # scipy.ndimage walks arrays in C order; on the transposed view (C-ordered, same
            # components) labelling a 512x512x600 Fortran-ordered mask took 10x less time
            self.apply(labels.T, label_values)
            return labels
        values = label_values if label_values is not None else [int(v) for v in np.unique(labels) if v != 0]
        for value in values:
            if value == 0:
                continue
            region = _bbox(labels == value)
            if region is None:
                continue
            sub = labels[region]  # a view: edits land in ``labels``
            mask = sub == value
            if self.largest_component or self.min_island_voxels:
                cc, n = ndimage.label(mask)
                if n > 1 or (self.min_island_voxels and n == 1):
                    sizes = _component_sizes(cc, n)
                    sizes[0] = 0
                    if self.largest_component:
                        drop = mask & (cc != int(np.argmax(sizes)))
                    else:
                        small = sizes < self.min_island_voxels
                        small[0] = False
                        drop = small[cc]
                    sub[drop] = 0
                    mask &= ~drop
                    del drop
                del cc
            if self.fill_holes and mask.any():
                inner = _bbox(mask)
                assert inner is not None
                holes = _holes(mask[inner])
                target = sub[inner]
                target[holes & (target == 0)] = value
        return labels


def _component_sizes(cc: np.ndarray, n: int) -> np.ndarray:
    """Voxels per component label ``0..n`` of ``cc``, counted slab by slab (np.bincount converts its
    input to int64: on a whole 512x512x600 label image that alone is a 1.2 GB temporary)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    step = max(1, (1 << 24) // max(1, int(np.prod(cc.shape[1:]))))
    for i in range(0, cc.shape[0], step):
        sizes += np.bincount(cc[i : i + step].ravel(order="K"), minlength=n + 1)
    return sizes


def _holes(mask: np.ndarray) -> np.ndarray:
    """Background voxels enclosed by ``mask`` (not connected to the array border, face connectivity).

    Same result as ``scipy.ndimage.binary_fill_holes(mask) & ~mask``, computed by one labelling of the
    background instead of fill_holes' iterated dilation (30 s vs ~2 s on a 512x512x600 mask).
    """
    bg, n = ndimage.label(~mask)
    if n == 0:
        return np.zeros_like(mask)
    border = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for idx in (0, -1):
            border[np.unique(np.take(bg, idx, axis=axis))] = True
    border[0] = True  # label 0 is the mask itself
    return ~border[bg]


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` plus a one-voxel margin (so hole filling sees the outside), or None."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    return tuple(out)
