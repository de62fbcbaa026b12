"""How much one case may cost, checked from the header before any voxel is decompressed or allocated.

One limit, :attr:`Limits.max_memory_gb` (``--max-memory-gb`` on ``convert``/``predict``/``evaluate``/
``app``, or ``RESUNET_MAX_MEMORY_GB``): the estimated peak memory of segmenting the case. The estimate is
``voxels x (bytes per input voxel + WORK_BYTES_PER_VOXEL) + BASE_BYTES``, where
:data:`WORK_BYTES_PER_VOXEL` is the memory that ``resunet predict`` holds per input voxel on top of the
input itself at its peak (float32 copies while resampling, the restored foreground probability and the
mask, post-processing labels; measured by ``bench/bench_memory.py``, see ``bench/results/memory.md``).
The same limit guards every command that reads a scan, so a 1.3 MB ``.nii.gz`` that inflates to
1100^3 voxels is refused in milliseconds rather than after minutes and gigabytes.

Also checked here, from the header: a scan needs at least :attr:`Limits.min_size` voxels along two
axes, and voxel sizes within :attr:`Limits.spacing_mm`; the model's own grid of the case (the input
resampled to the model's spacing) is checked by :meth:`Limits.check_model_grid` before it is made.

Every default is here; nothing else in resunet hard-codes a size limit (the zip extraction caps in
:mod:`resunet.io.archive` guard the disk, not memory).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from resunet.errors import ConfigError, InputError

#: Environment variable that sets :attr:`Limits.max_memory_gb` when no flag does.
ENV_MAX_MEMORY_GB = "RESUNET_MAX_MEMORY_GB"
#: Default limit, GB (2^30 bytes): leaves room for the OS, torch and a second case read ahead on a
#: 24 GB machine; a 512x512x2000 int16 CT is estimated at about 8.8 GB (measured peak 8.41 GB).
DEFAULT_MAX_MEMORY_GB = 16.0
#: Bytes per input voxel that predict holds at its peak on top of the input array, rounded up from the
#: worst case measured (bench/results/memory.md): a 512x512x2000 int16 CT as a DICOM series through
#: ``resunet predict`` with the default outputs (NIfTI mask + DICOM SEG) peaked at 8.41 GB, i.e. 13.2
#: bytes per voxel above the input and the 1 GiB base; as NIfTI it peaked at 4.09 GB.
WORK_BYTES_PER_VOXEL = 14
#: Fixed cost of a run (interpreter, torch, model), bytes.
BASE_BYTES = 1 << 30
#: Bytes per voxel assumed for a DICOM series before reading it (int16 CT/MR; rescaled data become
#: float32, counted in the margin of WORK_BYTES_PER_VOXEL).
DICOM_BYTES_PER_VOXEL = 2

GIB = float(1 << 30)


def series_shape(info: object) -> tuple[int, int, int]:
    """``(columns, rows, slices)`` of a DICOM ``SeriesInfo``: the shape its Volume will have."""
    return (int(info.cols), int(info.rows), int(info.n_slices))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Limits:
    """Per-case limits.

    Args:
        max_memory_gb: estimated peak memory (GB = 2^30 bytes) a case may need (see the module docstring).
        min_size: a scan to segment must have at least this many voxels along at least two axes.
        spacing_mm: ``(low, high)`` accepted voxel size in mm along every axis.
    """

    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB
    min_size: int = 4
    spacing_mm: tuple[float, float] = (1e-3, 1e3)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_memory_gb, (int, float)) and math.isfinite(self.max_memory_gb)) or self.max_memory_gb <= 0:
            raise ConfigError(f"--max-memory-gb must be a positive number of GB, got {self.max_memory_gb!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, max_memory_gb: float | None = None) -> "Limits":
        """``max_memory_gb`` if given, else ``$RESUNET_MAX_MEMORY_GB``, else the default."""
        if max_memory_gb is not None:
            return cls(max_memory_gb=float(max_memory_gb))
        env = os.environ if env is None else env
        text = (env.get(ENV_MAX_MEMORY_GB) or "").strip()
        if not text:
            return cls()
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{ENV_MAX_MEMORY_GB}={text!r} is not a number of GB") from None
        return cls(max_memory_gb=value)

    # -- estimates ---------------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return int(self.max_memory_gb * GIB)

    def estimate_bytes(self, voxels: int, itemsize: int) -> int:
        """Estimated peak memory of segmenting ``voxels`` input voxels of ``itemsize`` bytes."""
        return int(voxels) * (int(itemsize) + WORK_BYTES_PER_VOXEL) + BASE_BYTES

    def max_voxels(self, itemsize: int = 2) -> int:
        """The most input voxels of ``itemsize`` bytes that fit the limit."""
        return max(0, (self.max_bytes - BASE_BYTES) // (int(itemsize) + WORK_BYTES_PER_VOXEL))

    # -- checks ------------------------------------------------------------------------------------
    def check_size(self, source: object, shape: Sequence[int], itemsize: int, what: str = "") -> int:
        """Refuse a scan of ``shape`` (voxels per axis) whose estimated memory is above the limit.

        Returns:
            the estimate (bytes): what ``resunet serve`` reserves in its memory budget for the job.

        Raises:
            InputError: one line naming the input, its size, the estimate, the limit and the flag.
        """
        dims = [int(s) for s in shape]
        voxels = math.prod(dims) if dims else 0
        need = self.estimate_bytes(voxels, itemsize)
        if need > self.max_bytes:
            size = "x".join(str(s) for s in dims)
            raise InputError(
                f"{source}: {what or 'the scan'} is {size} = {voxels / 1e6:,.0f} million voxels of {itemsize} bytes;"
                f" segmenting it would need about {need / GIB:.1f} GB, above the limit of {self.max_memory_gb:g} GB"
                f" per case; if this machine has the memory, raise it with --max-memory-gb (or {ENV_MAX_MEMORY_GB})"
            )
        return need

    def check_min_size(self, source: object, shape: Sequence[int], what: str = "") -> None:
        """Refuse a scan to segment with fewer than :attr:`min_size` voxels along two axes (``resunet predict``
        checks it before loading the model; reading and converting small files stays allowed).

        Raises:
            InputError: naming the size found and the accepted minimum.
        """
        dims = [int(s) for s in shape]
        small = sorted(dims, reverse=True)[:2]
        if len(small) < 2 or small[1] < self.min_size:
            size = "x".join(str(s) for s in dims)
            raise InputError(
                f"{source}: {what or 'the scan'} is only {size} voxels; a scan to segment needs at least"
                f" {self.min_size} voxels along two axes; check that this is the image and not a placeholder"
            )

    def check_series(self, source: object, info: object) -> int:
        """:meth:`check_size` for a DICOM series from its headers (``info``: a ``SeriesInfo``); the estimate."""
        return self.check_size(source, series_shape(info), DICOM_BYTES_PER_VOXEL, what=f"series {info.uid}")  # type: ignore[attr-defined]

    def check_spacing(self, source: object, spacing: Sequence[float]) -> None:
        """Refuse voxel sizes (mm) outside :attr:`spacing_mm` (or not finite).

        Raises:
            InputError: naming the spacing found and the accepted range.
        """
        lo, hi = self.spacing_mm
        sp = [float(s) for s in spacing]
        if all(math.isfinite(s) and lo <= s <= hi for s in sp):
            return
        found = " x ".join(f"{s:.6g}" for s in sp)
        raise InputError(
            f"{source}: voxel size {found} mm is outside the accepted {lo:g} to {hi:g} mm per axis; the header's"
            " spacing (pixdim / PixelSpacing / slice positions) is wrong: fix it (e.g. nibabel, fslorient) and retry"
        )

    def check_model_grid(
        self, source: object, input_shape: Sequence[int], spacing: Sequence[float], grid: Sequence[int],
        model_spacing: Sequence[float | None] | None, channels: int = 1, classes: int = 2,
    ) -> None:
        """Refuse a case whose grid at the model's spacing is too large to hold.

        ``grid`` is the case resampled to the model's voxel size (what the network sees); the network
        grid holds the channels, the class probabilities and the blending weights in float32.

        Raises:
            InputError: naming the input's size and spacing, the model's spacing and the limit.
        """
        voxels = math.prod(int(g) for g in grid)
        need = voxels * 4 * (int(channels) + int(classes) + 2) + BASE_BYTES
        if need <= self.max_bytes:
            return
        found = " x ".join(f"{s:.4g}" for s in spacing)
        target = " x ".join("native" if s is None else f"{float(s):.4g}" for s in (model_spacing or ()))
        raise InputError(
            f"{source}: at the model's voxel size ({target} mm) this {'x'.join(str(int(s)) for s in input_shape)}"
            f" scan with voxels of {found} mm becomes {'x'.join(str(int(g)) for g in grid)} voxels, about"
            f" {need / GIB:.1f} GB, above the limit of {self.max_memory_gb:g} GB per case; check the voxel size in"
            f" the header, or raise the limit with --max-memory-gb (or {ENV_MAX_MEMORY_GB})"
        )


def add_limit_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-memory-gb`` to a subcommand's parser (convert, predict, evaluate, app)."""
    parser.add_argument(
        "--max-memory-gb", type=float, default=None, metavar="GB",
        help=f"refuse a case whose estimated peak memory is above this many GB, checked from its header before"
        f" reading (default ${ENV_MAX_MEMORY_GB} or {DEFAULT_MAX_MEMORY_GB:g}; a 512x512x2000 CT needs about"
        f" {Limits().estimate_bytes(512 * 512 * 2000, 2) / GIB:.0f})",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` of a parsed command line (``--max-memory-gb``, else the environment)."""
    return Limits.from_env(max_memory_gb=getattr(args, "max_memory_gb", None))


def export_limit(args: argparse.Namespace) -> Limits:
    """Check ``--max-memory-gb`` and put it into ``$RESUNET_MAX_MEMORY_GB`` of this process, so readers
    that take their limits from the environment (worker processes, the web UI's server) see it."""
    limits = limits_from_args(args)
    if getattr(args, "max_memory_gb", None) is not None:
        os.environ[ENV_MAX_MEMORY_GB] = repr(float(limits.max_memory_gb))
    return limits
