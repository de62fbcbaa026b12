"""Exported models: ONNX (onnxruntime) and TorchScript give the torch checkpoint's probabilities and mask."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from resunet.cli import main
from resunet.errors import ModelError
from resunet.inference import Predictor
from resunet.inference.model import METADATA_KEY, load_model
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, reorient, synthetic_scan


def test_onnx_and_torchscript_exports_agree_with_torch(tmp_path, capsys):
    scan = reorient(synthetic_scan(), "LPS")
    ckpt = make_checkpoint(tmp_path / "tiny.pt", scan, postprocess={"largest_component": True})
    onnx_path, ts_path = tmp_path / "tiny.onnx", tmp_path / "tiny.ts"
    assert main(["export", "--model", str(ckpt), "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert main(["export", "--model", str(ckpt), "--format", "torchscript", "--out", str(ts_path)]) == 0

    meta = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}[METADATA_KEY])
    torch_model = load_model(ckpt)
    assert meta["source_sha256"] == torch_model.sha256
    assert meta["labels"] == {"0": "background", "1": "object"} and meta["plan"]["spacing"] == [1.5, 1.5, 1.5]
    assert meta["postprocess"]["largest_component"] is True and meta["size_divisor"] == [8, 8, 8]

    ref = Predictor(ckpt, tta=False, sw_batch=3).predict(scan, probabilities=True)
    for path, kind in ((onnx_path, "onnx"), (ts_path, "torchscript")):
        pred = Predictor(path, tta=False, sw_batch=3).predict(scan, probabilities=True)
        assert pred.settings["backend"] == kind and pred.model_sha256 != ref.model_sha256
        diff = float(np.abs(pred.probabilities["object"].array - ref.probabilities["object"].array).max())
        with capsys.disabled():
            print(f"\n{kind}: max abs difference of probabilities vs torch = {diff:.2e}")
        assert diff < 1e-4, kind
        assert np.array_equal(pred.mask.array, ref.mask.array) and pred.mask.same_grid(scan)
        assert pred.settings["postprocess"]["largest_component"] is True

    capsys.readouterr()
    assert main(["info", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-test" in out and f"exported from checkpoint sha256 {torch_model.sha256}" in out

    with pytest.raises(ModelError, match="Monte Carlo dropout needs a checkpoint"):
        Predictor(onnx_path, uncertainty="mc")
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(ModelError, match="without resunet metadata"):
        load_model(bare)
