"""Training config: YAML round trip, key=value overrides, clear errors on unknown keys and bad values."""

import pytest

from resunet.errors import ConfigError
from resunet.training.config import TrainConfig


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig().override(["optim.lr=0.003", "plan.patch_size=[32, 48, 16]", "model.overrides.norm=batch",
                                  "dataset.val_cases=[a, b]", "amp=none", "validation.max_cases=null"])
    assert cfg.optim.lr == 0.003 and cfg.plan.patch_size == [32, 48, 16]
    assert cfg.model.overrides == {"norm": "batch"} and cfg.dataset.val_cases == ["a", "b"]
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = TrainConfig.from_yaml(path)
    assert again == cfg
    partial = tmp_path / "partial.yaml"
    partial.write_text("epochs: 7\noptim:\n  scheduler: cosine\n  warmup_epochs: 2\n")
    p = TrainConfig.from_yaml(partial)
    assert (p.epochs, p.optim.scheduler, p.optim.warmup_epochs, p.optim.lr) == (7, "cosine", 2, TrainConfig().optim.lr)


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        TrainConfig().override(["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="'optimm'"):
        TrainConfig().override(["optimm.lr=1"])
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        TrainConfig().override(["optim.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().override(["epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  presett: resnet34\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.presett'"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="optim.scheduler must be one of"):
        TrainConfig().override(["optim.scheduler=linear"]).check()
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
