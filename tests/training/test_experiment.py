"""What a config means for a run: a real model preset needs its checkpoint."""

import os

import pytest

from configs import invert4tvg, meco, timescope
from jaxgrounding import train


@pytest.mark.parametrize("module", [meco, timescope, invert4tvg])
def test_model_preset_without_checkpoint_stops_at_once(module, tmp_path):
    config = module.get_config("model=qwen2_5_vl_7b")
    with pytest.raises(ValueError, match=r"model=qwen2_5_vl_7b .*--config.model.checkpoint=.*Qwen/Qwen2.5-VL-7B"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data")  # nothing built


def test_tiny_preset_needs_no_checkpoint():
    from jaxgrounding.training import experiment

    assert experiment.checkpoint_name(meco.get_config("model=tiny")) == ""
