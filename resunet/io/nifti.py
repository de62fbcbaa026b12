"""NIfTI-1/-2 reading and writing (nibabel), with the geometry kept exactly.

Reading uses ``img.affine``, i.e. the sform when its code is non-zero, else the qform, else the
fall-back zoom matrix: the same choice nibabel, ITK-SNAP and FSL make. Voxels come back in the
file's own voxel order ``[i, j, k]`` (no reorientation) so that writing a mask with the same affine
and shape puts it exactly over the input.

Policies (documented in ``docs/io.md``):

- NaN / inf voxels: a warning is logged and they are set to 0 (scanners and resampling tools write
  NaN outside the field of view; 0 is what every viewer shows there). The count is kept in
  ``meta["nonfinite_voxels"]``.
- 4D files with one volume (shape ``(I, J, K, 1)``) are squeezed to 3D; with several volumes they are
  refused with a message telling the user to extract one 3D volume (e.g. ``fslroi in out 0 1``).
- 2D files (shape ``(I, J)``) become ``(I, J, 1)``.
- Scaled data (``scl_slope``/``scl_inter``) are returned as float32 unless slope 1 / intercept 0,
  in which case the stored integer dtype is kept so that a NIfTI -> NIfTI round trip is bit-exact.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from resunet.errors import GeometryError, InputError
from resunet.io.atomic import atomic_path
from resunet.io.limits import Limits
from resunet.io.volume import Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIfTI intent code for label maps (NIFTI_INTENT_LABEL).
NIFTI_INTENT_LABEL = 1002


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """True if the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def check_nifti(path: str | os.PathLike[str], limits: Limits | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file and check its header only (no voxel is read or decompressed).

    Checks: readable NIfTI-1/-2, no zero-sized dimension, 3D (or 4D with one volume), the file holds
    the bytes the header promises (``.nii``), and the case fits ``limits`` (size, memory estimate,
    voxel size; see :mod:`resunet.io.limits`). Returns the nibabel image with its lazy data proxy.

    Raises:
        InputError: as :func:`read_nifti`.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(
            f"{p}: not a readable NIfTI file ({_short(err)}); check the file is complete and really NIfTI"
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{p}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz first")
    shape = tuple(int(s) for s in img.shape)
    if any(s <= 0 for s in shape):
        raise InputError(f"{p}: a dimension has size 0 (shape {shape}); the file holds no voxels")
    if len(shape) > 3:
        extra = shape[3:]
        if int(np.prod(extra)) == 1:
            pass
        elif len(shape) == 4:
            raise InputError(
                f"{p}: is 4D with {shape[3]} volumes (shape {shape}); extract one 3D volume first,"
                f" e.g. `fslroi {p.name} vol0.nii.gz 0 1` or nibabel's `img.slicer[..., 0]`"
            )
        else:
            raise InputError(f"{p}: has {len(shape)} dimensions (shape {shape}); expected a 3D scan")
    _check_size(p, img)
    limits = limits if limits is not None else Limits.from_env()
    limits.check_size(p, *nifti_size(img))
    affine = np.asarray(img.affine, dtype=np.float64)
    if np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) >= 1e-12:
        limits.check_spacing(p, np.linalg.norm(affine[:3, :3], axis=0))
    return img


def nifti_size(img: nib.Nifti1Image) -> tuple[tuple[int, int, int], int]:
    """``(shape, bytes per voxel)`` of the Volume that reading ``img`` gives (what memory estimates use)."""
    shape = tuple(int(d) for d in img.shape)
    itemsize = img.header.get_data_dtype().itemsize
    if _is_scaled(img):
        itemsize = max(itemsize, 4)  # scaled data are read as float32
    return (shape[:3] + (1, 1, 1))[:3], itemsize  # type: ignore[return-value]


def check_nifti_stream(path: str | os.PathLike[str], limits: Limits | None = None) -> nib.Nifti1Image:
    """:func:`check_nifti`, and for ``.nii.gz`` the whole gzip stream decompressed and thrown away.

    Finds a truncated or damaged ``.nii.gz`` with the message :func:`read_nifti` gives, in constant
    memory (1 MiB at a time; a 600^3 volume is never held): what a service checks on upload instead of
    reading the volume in the request (8 parallel such reads took 4 GB).
    """
    p = Path(path)
    img = check_nifti(p, limits)
    if p.name.lower().endswith(".gz"):
        try:
            with gzip.open(p, "rb") as fh:
                while fh.read(1 << 20):
                    pass
        except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
            raise InputError(
                f"{p}: the voxel data cannot be read ({_short(err)}); the file is probably truncated, re-export it"
            ) from None
    return img


def read_nifti(path: str | os.PathLike[str], limits: Limits | None = None) -> Volume:
    """Read a NIfTI-1 or NIfTI-2 file (``.nii`` or ``.nii.gz``) into a :class:`Volume`.

    Args:
        path: the file.
        limits: per-case limits checked from the header before any voxel is read (default
            :meth:`Limits.from_env`).

    Returns:
        Volume with ``array`` shape ``(I, J, K)`` in the file's voxel order, ``affine`` voxel ->
        RAS mm, ``meta`` keys ``source``, ``format="nifti"``, ``nifti_header``, ``nonfinite_voxels``.

    Raises:
        InputError: unreadable, truncated or not a NIfTI file; 4D with several volumes; a zero-sized
            dimension; more than 4 dimensions; above the limits of :mod:`resunet.io.limits`.
        GeometryError: the affine is singular or not finite.
    """
    p = Path(path)
    img = check_nifti(p, limits)
    shape = tuple(int(s) for s in img.shape)
    try:
        scaled = _is_scaled(img)
        data = np.asanyarray(img.dataobj)
        if scaled:
            data = np.asarray(data, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(
            f"{p}: the voxel data cannot be read ({_short(err)}); the file is probably truncated, re-export it"
        ) from None
    except MemoryError:
        raise InputError(f"{p}: shape {shape} does not fit in memory; the header may be damaged") from None
    data = np.asarray(data)
    if data.ndim > 3:
        data = data.reshape(shape[:3])
    while data.ndim < 3:
        data = data[..., np.newaxis]
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    meta: dict = {
        "source": str(p),
        "format": "nifti",
        "nifti_header": img.header.copy(),
        "nonfinite_voxels": 0,
        "is_label": img.header.get_intent()[0] == "label",
    }
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            log.warning("%s: %d NaN/inf voxels set to 0", p, n_bad)
            data = np.where(bad, 0, data).astype(data.dtype)
            meta["nonfinite_voxels"] = n_bad
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryError(
            f"{p}: the voxel-to-world matrix (sform/qform) is singular or not finite; fix the header"
            " (e.g. `fslorient`) before using this file"
        )
    return Volume(array=data, affine=affine, meta=meta)


def _is_scaled(img: nib.Nifti1Image) -> bool:
    """True if ``scl_slope``/``scl_inter`` change the stored values (then they are read as float32)."""
    slope, inter = img.dataobj.slope, img.dataobj.inter
    return not (
        (slope is None or np.isnan(slope) or slope in (0, 1)) and (inter is None or np.isnan(inter) or inter == 0)
    )


def _check_size(p: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that promises more voxel bytes than the file can hold (truncated or damaged).

    Checked before reading so a damaged ``dim`` field never makes us allocate gigabytes. An
    uncompressed ``.nii`` must hold offset + voxels x itemsize bytes. For ``.nii.gz`` the uncompressed
    size is unknown without decompressing (the gzip trailer is unreliable for multi-member files),
    so only absurd sizes (over 64 GiB) are refused up front; a truncated stream fails while reading.
    """
    header = img.header
    nbytes = int(np.prod(img.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    expected = int(getattr(img.dataobj, "offset", header.get_data_offset())) + nbytes
    if nbytes > 64 * 1024**3:
        raise InputError(
            f"{p}: the header promises {nbytes / 1024**3:.0f} GiB of voxels (shape {img.shape}); the header is"
            " damaged or the scan is too large for resunet"
        )
    if not p.name.lower().endswith(".gz"):
        size = p.stat().st_size
        if size < expected:
            raise InputError(
                f"{p}: the header promises {expected} bytes (shape {img.shape}, {header.get_data_dtype()}) but"
                f" the file holds {size}; it is truncated or damaged, re-export it"
            )


def _header_for(volume: Volume, label: bool) -> nib.Nifti1Header | None:
    header = volume.meta.get("nifti_header")
    if header is None:
        return None
    if isinstance(header, nib.Nifti2Header):
        # keep it NIfTI-1 on output unless the grid does not fit NIfTI-1's int16 dims
        h1 = nib.Nifti1Header()
        for key in ("qform_code", "sform_code", "xyzt_units", "descrip"):
            h1[key] = header[key]
        return h1
    return header.copy()


def _to_image(volume: Volume, array: np.ndarray, label: bool) -> nib.Nifti1Image | nib.Nifti2Image:
    header = _header_for(volume, label)
    cls = nib.Nifti1Image if max(array.shape) < 32768 else nib.Nifti2Image
    if cls is nib.Nifti2Image:
        header = None
    img = cls(array, volume.affine, header=header)
    img.set_data_dtype(array.dtype)
    scode = int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1
    qcode = int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else 1
    img.set_sform(volume.affine, code=scode)
    img.set_qform(volume.affine, code=qcode)
    hdr = img.header
    hdr.set_slope_inter(1.0, 0.0)
    if header is None:
        hdr.set_xyzt_units("mm", "sec")
    if label:
        hdr.set_intent(NIFTI_INTENT_LABEL, (), name="label")
        hdr["cal_min"] = 0
        hdr["cal_max"] = float(array.max()) if array.size else 0.0
    elif hdr.get_intent()[0] == "label":  # an image written from a label map's header is not a label map
        hdr.set_intent("none", (), name="")
        hdr["cal_min"] = hdr["cal_max"] = 0
    return img


def _check_nifti_name(path: Path) -> None:
    if not is_nifti_path(path):
        raise InputError(f"{path}: output name must end in .nii or .nii.gz")


def write_nifti(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` to ``path`` (``.nii`` or ``.nii.gz``) atomically, array and affine unchanged.

    The data type is the array's own (no scaling), so reading the file back gives the same voxels
    bit for bit and the same affine. qform and sform both hold the affine; their codes come from the
    source NIfTI header when there is one (else 1, scanner anatomical).

    Returns:
        The written path.
    """
    p = Path(path)
    _check_nifti_name(p)
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    img = _to_image(volume, array, label=bool(volume.meta.get("is_label", False)))
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))
    return p


def write_mask_nifti(mask: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a label map (mask) NIfTI with exactly the mask's affine and shape.

    The array is stored as uint8 (labels up to 255) or uint16 (up to 65535); the header's intent
    is NIFTI_INTENT_LABEL so viewers show it as labels, and ``cal_min``/``cal_max`` span the labels.
    The mask should be on the input scan's grid (``scan.with_array(labels)``), which keeps the input's
    sform/qform codes.

    Raises:
        InputError: the mask holds negative, non-integer or too large values, or the name is not NIfTI.
    """
    p = Path(path)
    _check_nifti_name(p)
    array = np.asarray(mask.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{p}: a label map must hold whole numbers, got non-integer values")
    amin = array.min() if array.size else 0
    amax = array.max() if array.size else 0
    if amin < 0:
        raise InputError(f"{p}: a label map cannot hold negative labels (min {amin})")
    if amax <= 255:
        array = array.astype(np.uint8)
    elif amax <= 65535:
        array = array.astype(np.uint16)
    else:
        raise InputError(f"{p}: label {amax} is larger than 65535")
    img = _to_image(mask, array, label=True)
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))
    return p


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]
