"""Make the bundled example study from Debian's ``mricron-data`` Colin27 templates.

Inputs (``apt-get install mricron-data``; BSD-3-clause, Chris Rorden, see LICENSE-mricron.txt):
  /usr/share/mricron/templates/ch2.nii.gz     Colin27 T1, 181x217x181 at 1 mm, RAS, uint8
  /usr/share/mricron/templates/ch2bet.nii.gz  the same image brain-extracted (BET): 0 outside brain

Outputs (in resunet/data/example/, shipped inside the package), all on one 2 mm isotropic RAS grid of 91x109x91 voxels (the MNI
2 mm grid: origin (-90, -126, -72) mm):
  colin27_t1.nii.gz          T1, int16 (cubic resampling of the uint8 intensities, clipped to 0..255)
  colin27_brainmask.nii.gz   brain mask, uint8 0/1, label map
  colin27_t1_dicom/          the T1 as an MR DICOM series written by resunet.io.write_dicom_series

The brain mask: ch2bet > 0 at 1 mm, holes filled in 3D (dark CSF inside the brain can be 0 in the
BET image), then resampled to 2 mm by linear interpolation of the 0/1 mask and thresholded at 0.5
(the voxel is "brain" when at least half of it was brain at 1 mm), largest component kept.

Run:  .venv/bin/python data/example/make_example.py
"""

from __future__ import annotations

import datetime
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
#: the outputs are package data (this script stays in the repository's data/example, not shipped)
HERE = REPO / "resunet" / "data" / "example"
sys.path.insert(0, str(REPO))

from resunet.io.dicom_writer import write_dicom_series  # noqa: E402
from resunet.io.nifti import write_mask_nifti, write_nifti  # noqa: E402
from resunet.io.volume import Volume  # noqa: E402

SRC = Path("/usr/share/mricron/templates")
SPACING_MM = 2.0
SHAPE = (91, 109, 91)
ORIGIN_MM = (-90.0, -126.0, -72.0)
# Fixed UIDs under pydicom's root and a fixed date so re-running the script gives identical files.
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10001.1.1"
FOR_UID = "1.2.826.0.1.3680043.8.498.10001.1.2"
SOP_ROOT = "1.2.826.0.1.3680043.8.498.10001.1.1.1"  # slice k: SOP_ROOT.(k+1)


def main() -> None:
    t1 = nib.load(SRC / "ch2.nii.gz")
    bet = nib.load(SRC / "ch2bet.nii.gz")
    assert np.allclose(t1.affine, bet.affine) and t1.shape == bet.shape

    target_affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    target_affine[:3, 3] = ORIGIN_MM
    target = (SHAPE, target_affine)

    t1_2mm = resample_from_to(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), target, order=3)
    t1_arr = np.clip(np.round(np.asarray(t1_2mm.dataobj)), 0, 255).astype(np.int16)

    brain = np.asarray(bet.dataobj) > 0
    brain = ndimage.binary_fill_holes(brain)
    mask_2mm = resample_from_to(nib.Nifti1Image(brain.astype(np.float32), bet.affine), target, order=1)
    mask = np.asarray(mask_2mm.dataobj) >= 0.5
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask).astype(np.uint8)

    t1_vol = Volume(t1_arr, target_affine, {"source": "colin27_t1", "modality": "MR"})
    mask_vol = t1_vol.with_array(mask, is_label=True)
    write_nifti(t1_vol, HERE / "colin27_t1.nii.gz")
    write_mask_nifti(mask_vol, HERE / "colin27_brainmask.nii.gz")

    dicom_dir = HERE / "colin27_t1_dicom"
    if dicom_dir.exists():
        shutil.rmtree(dicom_dir)
    write_dicom_series(
        t1_vol,
        dicom_dir,
        modality="MR",
        series_description="Colin27 T1 2mm (mricron ch2)",
        patient_name="Colin27^Template",
        patient_id="COLIN27",
        study_description="resunet example study",
        study_uid=STUDY_UID,
        series_uid=SERIES_UID,
        frame_of_reference_uid=FOR_UID,
        sop_instance_uid_root=SOP_ROOT,
        date_time=datetime.datetime(2026, 11, 27, 0, 0, 0),
    )
    vox_ml = SPACING_MM**3 / 1000.0
    print(f"T1 {t1_arr.shape} int16 range {t1_arr.min()}..{t1_arr.max()}")
    print(f"brain mask: {int(mask.sum())} voxels = {mask.sum() * vox_ml:.1f} mL (1 mm BET mask: {brain.sum() / 1000:.1f} mL)")


if __name__ == "__main__":
    main()
