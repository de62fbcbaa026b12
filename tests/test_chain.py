"""Model chains (resunet.inference.chain): brain_extraction, then brain_tissue inside the extracted brain.

The bundled tissue model was trained on skull-stripped scans: on the whole example head it labels
scalp and skull as tissue (its model card: ~3.6 L of "tissue" against ~1.8 L skull-stripped). The
chain must give what brain_tissue gives on the scan stripped with brain_extraction's own mask, voxel
for voxel, and land close to the scan stripped with the example's reference brain mask.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.errors import InputError
from resunet.inference import Predictor
from resunet.inference.bundled import bundled_path
from resunet.inference.chain import ChainPredictor
from resunet.io import read_nifti
from resunet.package_data import EXAMPLE_BRAINMASK, EXAMPLE_T1

FAST = dict(tta=False, device="cpu")


@pytest.fixture(scope="module")
def steps():
    return Predictor(bundled_path("brain_extraction"), **FAST), Predictor(bundled_path("brain_tissue"), **FAST)


def _stripped(vol, keep):
    return vol.with_array(np.where(keep, vol.array, 0).astype(vol.array.dtype))


def test_chain_is_tissue_on_the_extracted_brain(steps):
    extraction, tissue = steps
    t1 = read_nifti(EXAMPLE_T1)
    chained = ChainPredictor([extraction, tissue]).predict(t1)

    brain = extraction.predict(t1).mask.array > 0
    by_hand = tissue.predict(_stripped(t1, brain)).mask.array
    expected = np.where(brain, by_hand, 0)
    assert np.array_equal(chained.mask.array, expected)
    assert not chained.mask.array[~brain].any()
    assert set(np.unique(chained.mask.array)) == {0, 1, 2, 3}
    assert chained.mask.same_grid(t1)
    vox = t1.voxel_volume_ml
    for v, name in tissue.labels.items():
        if v:
            assert chained.voxel_counts[name] == int((expected == v).sum())
            assert chained.volumes_ml[name] == pytest.approx((expected == v).sum() * vox, abs=1e-6)
    assert chained.model_name == "brain_extraction -> brain_tissue"
    assert [r["step"] for r in chained.models] == [1, 2]
    assert [r["sha256"] for r in chained.models] == [extraction.model.sha256, tissue.model.sha256]
    assert [s["model"] for s in chained.settings["chain"]] == ["brain_extraction", "brain_tissue"]
    assert {"step1_total", "step2_total", "total"} <= set(chained.timings)

    # what the chain is for: close to tissue on the reference-stripped scan, far from the unstripped run
    ref_brain = read_nifti(EXAMPLE_BRAINMASK).array > 0
    reference = sum(tissue.predict(_stripped(t1, ref_brain)).volumes_ml.values())
    unstripped = sum(tissue.predict(t1).volumes_ml.values())
    total = sum(chained.volumes_ml.values())
    assert abs(total - reference) < 0.1 * reference, (total, reference)
    assert unstripped > 1.5 * reference, (unstripped, reference)


def test_chain_with_nothing_found_says_which_model_found_nothing(steps):
    _, tissue = steps
    t1 = read_nifti(EXAMPLE_T1)
    # brain_extraction whose post-processing drops every island under 10^7 voxels (the scan has 0.9 M):
    # a real first step that finds nothing
    finds_nothing = Predictor(bundled_path("brain_extraction"), postprocess={"min_island_voxels": 10**7}, **FAST)
    assert not finds_nothing.predict(t1).mask.array.any()
    with pytest.raises(InputError, match="brain_extraction found no foreground .* nothing for brain_tissue"):
        ChainPredictor([finds_nothing, tissue]).predict(t1)


def test_predict_then_cli_writes_the_chain_and_records_both_models(tmp_path, steps):
    extraction, tissue = steps
    out = tmp_path / "out"
    rc = main(["predict", str(EXAMPLE_T1), "--model", "brain_extraction", "--then", "brain_tissue",
               "--out", str(out), "--no-tta", "--device", "cpu", "--no-audit", "--no-progress"])
    assert rc == 0
    mask = nib.load(out / "colin27_t1.nii.gz")
    t1 = read_nifti(EXAMPLE_T1)
    expected = ChainPredictor([extraction, tissue]).predict(t1).mask.array
    assert np.array_equal(np.asarray(mask.dataobj), expected)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"]["name"] == "brain_extraction -> brain_tissue"
    assert [m["name"] for m in summary["model"]["members"]] == ["brain_extraction", "brain_tissue"]
    assert [c["model"] for c in summary["settings"]["chain"]] == ["brain_extraction", "brain_tissue"]

    rc = main(["predict", str(EXAMPLE_T1), "--then", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o2"),
               "--no-tta", "--no-audit", "--no-progress"])
    assert rc == 2
