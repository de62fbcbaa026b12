"""The Volume type and the atomic writer every output goes through."""

import hashlib
import os

import nibabel as nib
import numpy as np
import pytest

from resunet.errors import GeometryError, InputError
from resunet.io import Volume, atomic_path, sha256_file, sha256_path


def test_geometry_properties():
    affine = np.array([[-0.8, 0, 0, 90.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    vol = Volume(np.zeros((10, 12, 4), np.int16), affine, meta={"source": "scan.nii.gz"})
    assert vol.shape == (10, 12, 4)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.5))
    assert vol.orientation == "LPS"
    assert vol.voxel_volume_ml == pytest.approx(0.8 * 0.8 * 2.5 / 1000)
    np.testing.assert_allclose(vol.origin, (90, 120, -60))
    assert "LPS" in vol.describe_grid() and "0.8x0.8x2.5" in vol.describe_grid()
    mask = vol.with_array(np.ones((10, 12, 4), np.uint8), is_label=True)
    assert mask.same_grid(vol) and mask.meta["is_label"] and not vol.meta.get("is_label")
    with pytest.raises(GeometryError):
        vol.with_array(np.ones((10, 12, 5), np.uint8))


def test_nifti_image_keeps_array_and_affine(tmp_path):
    affine = np.array([[0, 0, 1.2, -3.0], [-1.0, 0, 0, 4.0], [0, 0.9, 0, 5.0], [0, 0, 0, 1]])
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = tmp_path / "x.nii.gz"
    nib.save(Volume(data, affine).to_nifti(), path)
    img = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert img.get_data_dtype() == np.int16


@pytest.mark.parametrize("shape", [(0, 3, 3), (3, 3)])
def test_bad_arrays_are_refused(shape):
    with pytest.raises(InputError):
        Volume(np.zeros(shape), np.eye(4), meta={"source": "bad.nii"})


def test_singular_affine_is_refused():
    with pytest.raises(GeometryError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == final.parent
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert not final.exists() and os.listdir(final.parent) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and os.listdir(final.parent) == ["mask.nii.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask


def test_hashes_change_with_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.dcm").write_bytes(b"one")
    h1 = sha256_path(tmp_path / "a")
    assert sha256_file(tmp_path / "a" / "1.dcm") == hashlib.sha256(b"one").hexdigest()
    (tmp_path / "a" / "1.dcm").write_bytes(b"One")
    assert sha256_path(tmp_path / "a") != h1
