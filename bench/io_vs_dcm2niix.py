"""Compare resunet's DICOM reader with dcm2niix (Debian package ``dcm2niix``) on several series.

For each series: ``dcm2niix -z n`` writes a NIfTI; both it and our Volume are brought to the closest
RAS orientation with nibabel (a pure permutation/flip, no resampling) and compared: voxel values
(dcm2niix's scaled values) and the affine (max abs difference, mm). dcm2niix is not a test
dependency; run by hand: ``.venv/bin/python bench/io_vs_dcm2niix.py``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import make_volume, oblique_affine  # noqa: E402

from resunet.io import load_study, write_dicom_series  # noqa: E402


def compare(name: str, path: Path, work: Path) -> str:
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    if path.is_dir():
        for f in path.rglob("*"):
            if f.is_file():
                shutil.copy(f, src / f"{f.parent.name}_{f.name}")
    else:
        shutil.copy(path, src / path.name)
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "x", str(src)], capture_output=True, check=False)
    niis = sorted(out.glob("*.nii"))
    if not niis:
        return f"| {name} | dcm2niix wrote nothing | |"
    ours = load_study(path)
    ref = max(niis, key=lambda p: np.prod(nib.load(p).shape))
    a = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(ours.array, dtype=np.float64), ours.affine))
    b = nib.as_closest_canonical(nib.load(ref))
    b_data = np.squeeze(b.get_fdata())
    if b_data.ndim == 2:
        b_data = b_data[..., None]
    if a.shape != b_data.shape:
        return f"| {name} | shape {a.shape} vs dcm2niix {b_data.shape} | |"
    same = np.allclose(a.get_fdata(), b_data, rtol=1e-5, atol=1e-4)
    d_aff = float(np.max(np.abs(a.affine - b.affine)))
    return f"| {name} | voxels {'equal' if same else 'DIFFER'} | affine max diff {d_aff:.2g} mm |"


def main() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="resunet-dcm2niix-"))
    try:
        oblique = work / "oblique"
        write_dicom_series(make_volume(shape=(24, 20, 12), affine=oblique_affine()), oblique)
        lps = work / "lps"
        aff = np.diag([-0.8, -0.9, 2.5, 1.0])
        aff[:3, 3] = (10, 20, 30)
        write_dicom_series(make_volume(shape=(24, 20, 12), affine=aff, seed=3), lps, modality="CT")
        dicomdir = Path(get_testdata_file("DICOMDIR")).parent
        cases = {
            "bundled Colin27 series (91 slices)": REPO / "resunet" / "data" / "example" / "colin27_t1_dicom",
            "own oblique MR series": oblique,
            "own LPS CT series": lps,
            "dicomdirtests CT5N (5 slices)": dicomdir / "98892001" / "CT5N",
            "CT_small.dcm": Path(get_testdata_file("CT_small.dcm")),
            "MR_small.dcm": Path(get_testdata_file("MR_small.dcm")),
            "eCT_Supplemental.dcm (enhanced CT)": Path(get_testdata_file("eCT_Supplemental.dcm")),
            "JPEG-LL.dcm": Path(get_testdata_file("JPEG-LL.dcm")),
        }
        print("| series | voxels | geometry |")
        print("|---|---|---|")
        for name, path in cases.items():
            print(compare(name, path, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
