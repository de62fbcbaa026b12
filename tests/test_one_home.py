"""Each thing stated once (issue 18 point 5): the network's settings, the warm-up, the default
model, the study routing shared by the reader and the header check."""

from __future__ import annotations

import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from resunet.errors import InputError
from resunet.inference import Predictor
from resunet.io import load_study
from resunet.io.loader import route_study
from resunet.io.nifti import write_nifti
from resunet.io.precheck import check_study
from resunet.nets import ResUNet, ResUNetConfig
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, synthetic_scan

REPO = Path(__file__).resolve().parents[1]


def test_resunet_takes_exactly_the_config_builders_arguments_with_one_default_each():
    net_params = dict(inspect.signature(ResUNet).parameters)
    build_params = dict(inspect.signature(ResUNetConfig.build).parameters)
    assert list(net_params) == list(build_params)
    assert {k: p.default for k, p in net_params.items()} == {k: p.default for k, p in build_params.items()}
    # the one strides default: 1 for the first stage, 2 for the others, whatever the number of stages
    net = ResUNet(3, 1, 2, widths=[4, 8, 16], blocks=1)
    assert net.config["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert ResUNetConfig.build(2, 1, 2, widths=[4, 8], blocks=1).strides == [[1, 1], [2, 2]]
    assert ResUNet(2, 1, 2, widths=[4, 8, 16, 32], blocks=1).config["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(TypeError, match="widthz"):
        ResUNet(3, 1, 2, widthz=[4], blocks=1)


def test_warm_up_runs_the_network_once_on_zeros_and_leaves_the_blank_check_on(tmp_path):
    scan = synthetic_scan()
    predictor = Predictor(make_checkpoint(tmp_path / "tiny.pt", scan), tta=False)
    predictor.warm_up()  # zeros on purpose: no InputError
    blank = scan.with_array(np.zeros(scan.shape, np.float32))
    with pytest.raises(InputError):
        predictor.predict(blank)
    assert predictor.predict(scan).mask.shape == scan.shape


def test_the_service_finds_the_default_model_without_importing_the_cli(tmp_path):
    code = (
        "import sys\n"
        "from resunet.serve.config import ServeConfig\n"
        "from resunet.serve.service import Service\n"
        "from resunet.inference.bundled import default_model_path, bundled_path\n"
        f"svc = Service(ServeConfig(state_dir={str(tmp_path / 'state')!r})).open()\n"
        "assert svc.model_path == default_model_path() == bundled_path('brain_extraction'), svc.model_path\n"
        "print(sorted(m for m in sys.modules if m.startswith('resunet.cli')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_header_check_and_reader_route_a_study_the_same_way(tmp_path):
    scan = synthetic_scan()
    nii = tmp_path / "scan.nii.gz"
    write_nifti(scan, nii)
    disguised = tmp_path / "upload.bin"  # a zip without its suffix
    with zipfile.ZipFile(disguised, "w") as zf:
        zf.write(nii, "inside/scan.nii.gz")
    assert route_study(nii).kind == "nifti" and route_study(disguised).kind == "zip"
    assert route_study(tmp_path).kind == "dicom"
    dicomdir = tmp_path / "DICOMDIR"
    dicomdir.write_bytes(b"")
    assert route_study(dicomdir).path == tmp_path and route_study(dicomdir).dicomdir
    for path, series, match in [(tmp_path / "missing", None, "no such file or folder"),
                                (nii, "1.2.3", "--series applies to DICOM input")]:
        with pytest.raises(InputError, match=match):
            load_study(path, series)
        with pytest.raises(InputError, match=match):
            check_study(path, series)
    check_study(disguised, deep=True)  # the zipped NIfTI, checked as the reader reads it
    assert load_study(disguised).shape == scan.shape
