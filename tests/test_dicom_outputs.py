"""Every DICOM object resunet writes passes dicom3tools' dciodvfy (issue 25 points 9-11 and its "done
when"; issue 26 point 3): the example series and series from write_dicom_series, the SEG, the
RTSTRUCT and the SR of `resunet predict --format seg,rtstruct,sr`; the SEG codes each tissue label
with its own SNOMED CT category and type (the model card's codes first) and carries the RTSTRUCT's
colours as RecommendedDisplayCIELabValue."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE_DIR, make_volume, oblique_affine
from dicom_checks import assert_dciodvfy_clean, assert_study_consistent, dciodvfy

from resunet.io import load_study, write_dicom_seg, write_dicom_series
from resunet.io.dicom_codes import LABEL_COLOURS, codes_from_model_card, label_colour
from resunet.io.rtstruct import write_rtstruct

TISSUE = {1: "CSF", 2: "grey matter", 3: "white matter", 4: "brain"}
#: (category, type) SNOMED CT code values expected per label
EXPECTED = {"CSF": ("91720002", "65216001"), "grey matter": ("91723000", "389081007"),
            "white matter": ("91723000", "389080008"), "brain": ("91723000", "12738006")}
CARD_CODES = {"brain": {"category": ["91723000", "SCT", "Anatomical Structure"],
                        "type": ["83678007", "SCT", "Cerebrum"]}}


def test_example_series_is_clean_for_dciodvfy():
    files = sorted((EXAMPLE_DIR / "colin27_t1_dicom").glob("*.dcm"))
    assert len(files) == 91
    assert_dciodvfy_clean(files)


@pytest.mark.parametrize("modality,dtype", [("MR", "int16"), ("CT", "int16"), ("MR", "float32")])
def test_written_series_is_clean_for_dciodvfy(tmp_path, modality, dtype):
    vol = make_volume(shape=(10, 8, 3), affine=oblique_affine(), dtype=dtype)
    paths = write_dicom_series(vol, tmp_path / "s", modality=modality)
    ds = pydicom.dcmread(paths[0])
    assert ds.PatientPosition == "HFS" and "Laterality" in ds
    assert len(ds.ImageType) == 3 and ds.ImageType[2]
    if modality == "MR" and dtype == "int16":
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds  # not MR Image attributes
        assert_dciodvfy_clean(paths)
    elif modality == "MR":  # float data need Rescale: dciodvfy warns of it (docs/io.md)
        errors, warnings = dciodvfy(paths[0])
        assert errors == [] and any("Rescale" in w for w in warnings)
    else:
        assert ds.RescaleType == "HU"
        assert_dciodvfy_clean(paths)
    back = load_study(tmp_path / "s")
    np.testing.assert_allclose(np.asarray(back.array), np.asarray(vol.array), atol=0.01)


@pytest.fixture(scope="module")
def tissue_objects(tmp_path_factory):
    """A 4-label SEG and RTSTRUCT written for an oblique series."""
    tmp = tmp_path_factory.mktemp("tissue")
    write_dicom_series(make_volume(shape=(24, 20, 5), affine=oblique_affine()), tmp / "s")
    src = load_study(tmp / "s")
    labels = np.zeros(src.shape, np.uint8)
    labels[2:20, 2:18, 1:4] = 4
    labels[4:18, 4:16, 1:4] = 2
    labels[7:15, 7:13, 1:4] = 3
    labels[10:12, 9:11, 1:4] = 1
    mask = src.with_array(labels, is_label=True)
    seg = write_dicom_seg(mask, src, tmp / "seg.dcm", TISSUE)
    rs = write_rtstruct(mask, src, tmp / "rs.dcm", TISSUE)
    return src, seg, rs


def test_seg_codes_each_tissue_label_specifically(tissue_objects):
    _, seg, _ = tissue_objects
    ds = pydicom.dcmread(seg)
    got = {s.SegmentLabel: (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                            s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in ds.SegmentSequence}
    assert got == EXPECTED
    assert all(s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT" for s in ds.SegmentSequence)
    assert "ContentCreatorName" in ds  # Type 2 (Content Identification macro)


def test_seg_colours_are_the_rtstruct_colours(tissue_objects):
    _, seg, rs = tissue_objects
    seg_ds, rs_ds = pydicom.dcmread(seg), pydicom.dcmread(rs)
    names = {int(r.ROINumber): r.ROIName for r in rs_ds.StructureSetROISequence}
    roi_rgb = {names[int(rc.ReferencedROINumber)]: tuple(int(v) for v in rc.ROIDisplayColor)
               for rc in rs_ds.ROIContourSequence}
    assert roi_rgb == {name: label_colour(v) for v, name in TISSUE.items()}
    assert len(set(roi_rgb.values())) == len(TISSUE)
    for s in seg_ds.SegmentSequence:
        lab = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in s.RecommendedDisplayCIELabValue))
        assert np.allclose(lab.to_rgb(), roi_rgb[s.SegmentLabel], atol=2), s.SegmentLabel


def test_seg_and_rtstruct_are_clean_for_dciodvfy(tissue_objects):
    _, seg, rs = tissue_objects
    assert_dciodvfy_clean([seg, rs])


def test_viewer_uses_the_dicom_colours():
    from resunet.webui import viewer

    assert viewer.LABEL_COLOURS == LABEL_COLOURS
    assert [viewer.label_colour(v) for v in range(1, 10)] == [label_colour(v) for v in range(1, 10)]


def _tiny_model_with_card_codes(path):
    import torch

    from resunet.nets import ResUNet
    from resunet.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = ResUNet.from_preset("tiny", spatial_dims=3, in_channels=1, out_channels=2)
    with torch.no_grad():  # every voxel "brain": a known mask
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-1.0, 1.0]))
    save_checkpoint(
        path, state_dict=net.state_dict(), network=net.config,
        plan={"spacing": [6.0, 6.0, 6.0], "normalization": [{"scheme": "zscore"}], "patch_size": [32, 32, 32],
              "batch_size": 2, "spatial_dims": 3, "modality": "MR"},
        labels={0: "background", 1: "brain"}, channels=["T1"],
        postprocess={"largest_component": False, "fill_holes": False, "min_island_voxels": 0},
        model_card={"name": "tiny-coded", "intended_use": "tests", "training_data": "none", "label_codes": CARD_CODES},
    )
    return path


def test_predict_outputs_carry_the_model_card_codes_and_pass_dciodvfy(tmp_path):
    from resunet.cli import main

    model = _tiny_model_with_card_codes(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    assert main(["predict", str(EXAMPLE_DIR / "colin27_t1_dicom"), "--out", str(out), "--model", str(model),
                 "--no-tta", "--format", "seg,rtstruct,sr", "--no-audit", "--no-progress"]) == 0
    case = json.loads((out / "predictions.json").read_text())["cases"][0]
    files = {k: out / v["path"] for k, v in case["outputs"].items()}
    assert set(files) == {"seg", "rtstruct", "sr"}
    seg = pydicom.dcmread(files["seg"], stop_before_pixels=True)
    item = seg.SegmentSequence[0]
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "83678007"  # the card's, not the table's
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Cerebrum"
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(files["sr"]))
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    assert group.finding_type.value == "83678007"
    assert_dciodvfy_clean(files.values())
    assert_study_consistent([*files.values(), *sorted((EXAMPLE_DIR / "colin27_t1_dicom").glob("*.dcm"))])


def test_model_card_codes_that_are_not_codes_are_refused():
    from resunet.errors import ModelError

    with pytest.raises(ModelError, match="label_codes.*fix the model card"):
        codes_from_model_card({"label_codes": {"brain": {"category": ["1", "SCT"], "type": ["2", "SCT", "x"]}}})
    assert codes_from_model_card({"name": "no codes"}) == {}
