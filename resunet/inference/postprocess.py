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
        values = label_values if label_values is not None else [int(v) for v in np.unique(labels) if v != 0]
        for value in values:
            if value == 0:
                continue
            region = _bbox(labels == value)
            if region is None:
                continue
            sub = labels[region]
            mask = sub == value
            if self.largest_component or self.min_island_voxels:
                cc, n = ndimage.label(mask)
                if n > 1 or self.min_island_voxels:
                    sizes = np.bincount(cc.ravel())
                    sizes[0] = 0
                    if self.largest_component:
                        keep = np.zeros_like(sizes, dtype=bool)
                        keep[int(np.argmax(sizes))] = True
                    else:
                        keep = sizes >= self.min_island_voxels
                        keep[0] = False
                    drop = mask & ~keep[cc]
                    sub[drop] = 0
                    mask &= ~drop
                del cc
            if self.fill_holes and mask.any():
                filled = ndimage.binary_fill_holes(mask)
                sub[filled & (sub == 0)] = value
        return labels


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
