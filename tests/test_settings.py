"""One default per setting: the config files hold the defaults, and a settings dataclass built from a config
section has no default of its own for a field that section sets (so the two cannot disagree)."""

import dataclasses

import pytest

from configs import invert4tvg, meco, timescope
from jaxgrounding.inference import AssignmentConfig
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.memory.layout import StreamingConfig
from jaxgrounding.sampling import SamplingConfig
from jaxgrounding.tasks.coarse_to_fine import CoarseToFineConfig
from jaxgrounding.tasks.encoding import EncoderConfig
from jaxgrounding.training.grpo import GRPOConfig
from jaxgrounding.training.optim import OptimizerConfig, TrainableConfig

CONFIGS = {"meco": meco, "timescope": timescope, "invert4tvg": invert4tvg}

# dataclass -> (config section, prefix of its keys there).
SECTIONS = {
    SamplingConfig: ("sampling", ""),
    AssignmentConfig: ("assignment", ""),
    CoarseToFineConfig: ("coarse_to_fine", ""),
    StreamingConfig: ("streaming", ""),
    HVRConfig: ("streaming", "hvr_"),
    TrainableConfig: ("trainable", ""),
    OptimizerConfig: ("optimizer", ""),
    EncoderConfig: ("encoder", ""),
    GRPOConfig: ("grpo", ""),
}


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda c: c.__name__)
def test_no_dataclass_default_for_a_field_the_config_sets(cls, name):
    config = CONFIGS[name].get_config()
    section, prefix = SECTIONS[cls]
    if section not in config:
        return
    keys = {prefix + f.name for f in dataclasses.fields(cls)} & set(config[section])
    defaulted = {prefix + f.name for f in dataclasses.fields(cls) if _has_default(f)}
    assert not keys & defaulted, f"{cls.__name__}: defaults for {sorted(keys & defaulted)}, also set in {name}.py"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_builds_every_settings_object(name):
    config = CONFIGS[name].get_config()
    sampling = SamplingConfig.from_config(config)
    assert sampling.max_new_tokens == config.sampling.max_new_tokens
    assert AssignmentConfig.from_config(config).nms_iou == config.assignment.nms_iou
    assert CoarseToFineConfig.from_config(config).margin == config.coarse_to_fine.margin
    assert OptimizerConfig.from_config(config).total_steps == config.train.steps
    assert TrainableConfig.from_config(config).vision == config.trainable.vision
    assert EncoderConfig.from_config(config, train=True).frame_size == tuple(config.data.frame_size)
    streaming = StreamingConfig.from_config(config)
    # The buffer holds exactly the longest video the data section lets through (two frames per grid).
    grids = config.data.max_frames // 2
    assert (
        (streaming.max_segments - 1) * streaming.segment_frames
        < grids
        <= streaming.max_segments * streaming.segment_frames
    )


def test_timescope_streams_with_the_base_settings():
    base, long = meco.get_config(), timescope.get_config()
    assert (base.memory, long.memory) == ("full", "streaming")
    assert long.streaming == base.streaming and long.coarse_to_fine == base.coarse_to_fine
    assert StreamingConfig.from_config(long).max_segments == 13  # 200 frames in segments of 16
    assert StreamingConfig.from_config(timescope.get_config("model=qwen2_5_vl_7b")).max_segments == 128


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compute_dtype_auto_is_the_parameter_dtype(name):
    import jax.numpy as jnp

    from jaxgrounding import settings

    config = CONFIGS[name].get_config()
    assert config.model.compute_dtype == "auto"
    assert settings.model_dtypes(config) == (jnp.float32, jnp.float32)
    with config.unlocked():
        config.model.dtype = "bfloat16"
    assert settings.model_dtypes(config) == (jnp.bfloat16, jnp.bfloat16)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_model_recipes_keep_float32_weights_and_compute_in_bfloat16(name):
    import jax.numpy as jnp

    from jaxgrounding import settings

    config = CONFIGS[name].get_config("model=qwen2_5_vl_3b")
    assert settings.model_dtypes(config) == (jnp.float32, jnp.bfloat16)


def test_an_unknown_compute_dtype_is_refused_by_name():
    from jaxgrounding.train import check_config

    config = meco.get_config()
    with config.unlocked():
        config.model.compute_dtype = "float16"
    with pytest.raises(ValueError, match=r"model\.compute_dtype='float16': supported are \['bfloat16', 'float32', 'auto'\]"):
        check_config(config)
