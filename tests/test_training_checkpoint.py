"""Checkpoints: self-describing, loadable with weights_only, atomic, clear errors on bad files."""

import numpy as np
import pytest
import torch

from resunet.errors import ModelError
from resunet.io.hashing import sha256_file
from resunet.preprocess import Normalization, PreprocessPlan
from resunet.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint


def _save(path, **extra):
    net = torch.nn.Conv3d(1, 2, 3)
    plan = PreprocessPlan(spacing=(2.0, 2.0, 2.0), normalization=[Normalization("zscore")]).to_dict()
    plan.update(patch_size=(32, 32, 32), batch_size=2, spatial_dims=3, modality="MR")
    wrapped = {"module." + k: v for k, v in net.state_dict().items()}
    digest = save_checkpoint(path, state_dict=wrapped, network={"spatial_dims": 3, "strides": ((1, 1, 1), (2, 2, 2))},
                             plan=plan, labels={0: "background", 1: "brain"}, channels=["T1"],
                             fingerprint="abc", **extra)
    return net, digest


def test_round_trip_and_weights_only(tmp_path):
    path = tmp_path / "run" / "best.pt"
    rng_state = {"numpy": np.random.get_state()[1], "torch": torch.get_rng_state(), "epoch": 3}
    net, digest = _save(path, train_state=rng_state)
    raw = torch.load(path, weights_only=True)  # must not need unpickling of arbitrary objects
    assert raw["format"] == FORMAT
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == digest == sha256_file(path)
    assert set(ckpt.state_dict) == set(net.state_dict())  # "module." prefix removed
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt.state_dict[k], v)
    assert ckpt.labels == {"0": "background", "1": "brain"}
    assert ckpt.network["strides"] == [[1, 1, 1], [2, 2, 2]]
    assert ckpt.patch_size == [32, 32, 32] and ckpt.spatial_dims == 3
    assert ckpt.preprocess_plan.spacing == (2.0, 2.0, 2.0)
    assert ckpt.preprocess_plan.normalization[0].scheme == "zscore"
    assert ckpt.train_state["epoch"] == 3
    assert torch.equal(ckpt.train_state["numpy"], torch.from_numpy(np.random.get_state()[1]))
    assert ckpt.versions["torch"] == torch.__version__
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind


def test_bad_files_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    _save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelError, match="truncated or not a torch file"):
        load_checkpoint(truncated)
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bare)
    with pytest.raises(ModelError, match="not a resunet checkpoint"):
        load_checkpoint(bare)
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": Normalization()}, evil)
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_checkpoint(evil)
