"""Generation with the KV cache against a loop of full forward passes, and sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrounding.model as jm
from jaxgrounding import sampling
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q25"))
    ref.build_reference("qwen2_5_vl", path)
    return jm.from_pretrained(path)


def test_greedy_generation_equals_repeated_full_forward(model):
    rng = np.random.default_rng(0)
    # right padding: the pipeline's layout
    samples = [[("text", 3), ("video", (2, 4, 8), 1.0), ("text", 2)], [("text", 6)]]
    batch = ref.make_batch(samples, rng=rng, patch_dim=model.config.vision.patch_dim)
    lengths = batch["attention_mask"].sum(1)
    ids = np.zeros_like(batch["input_ids"])
    mask = np.zeros_like(batch["attention_mask"])
    for b, n in enumerate(lengths):  # move left padding to the right
        ids[b, :n] = batch["input_ids"][b, -n:]
        mask[b, :n] = 1
    inputs = jm.prepare_inputs(
        model.config,
        ids,
        mask,
        pixel_values_videos=batch["pixel_values_videos"],
        video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"],
    )
    steps = 5
    gen = sampling.generate(
        model, inputs, sampling.SamplingConfig(max_new_tokens=steps), end_ids=[299], hidden_layers=(-2,)
    )
    for b in range(2):
        seq = list(ids[b, : lengths[b]])
        for k in range(steps):
            out = model(
                input_ids=np.array([seq]),
                pixel_values_videos=batch["pixel_values_videos"] if b == 0 else None,
                video_grid_thw=batch["video_grid_thw"] if b == 0 else None,
                second_per_grid_ts=batch["second_per_grid_ts"] if b == 0 else None,
                hidden_layers=(-2,),
            )
            want = int(np.argmax(np.asarray(out.logits)[0, -1]))
            assert int(gen.tokens[b, k]) == want, (b, k)
            np.testing.assert_allclose(
                np.asarray(gen.predicting[-2])[b, k], np.asarray(out.hidden_states[-2])[0, -1], atol=1e-4
            )
            seq.append(want)


def test_generation_stops_at_end_token(model):
    inputs = jm.prepare_inputs(model.config, np.array([[5, 6, 7]]))
    first = int(sampling.generate(model, inputs, sampling.SamplingConfig(max_new_tokens=1), end_ids=[299]).tokens[0, 0])
    gen = sampling.generate(model, inputs, sampling.SamplingConfig(max_new_tokens=6), end_ids=[first])
    assert int(gen.lengths[0]) == 1
    assert (np.asarray(gen.tokens)[0] == first).all()  # the end token repeats after the stop


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda config: np.array([int(sampling.sample_tokens(logits, k, config)[0]) for k in keys])
    assert set(draw(sampling.SamplingConfig(temperature=1.0, top_k=2))) <= {0, 1}
    assert set(draw(sampling.SamplingConfig(temperature=1.0, top_p=0.7))) <= {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draw(sampling.SamplingConfig(temperature=1.0, top_p=0.5))) == {0}
    counts = np.bincount(draw(sampling.SamplingConfig(temperature=1.0)), minlength=4) / 400
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.07)
    assert int(sampling.sample_tokens(logits, keys[0], sampling.SamplingConfig(temperature=0.0))[0]) == 0
