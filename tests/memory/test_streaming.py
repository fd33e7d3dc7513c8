"""Streaming prefill: with nothing pooled (r = 1) it is the full forward pass; memory order does not
matter; the recent-segment window; sharded equals single-device; generation over a memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrounding import parallel, sampling
from jaxgrounding.memory import streaming
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.model.decoder import CACHE_AXES, KVCache, Memory
from jaxgrounding.objectives.structural import pool_frame_states
from jaxgrounding.training import experiment
from jaxgrounding.grounding_model import batch_inputs, batch_plan, device_batch
from tests.test_train import first_batch, micro_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    config = micro_config(root / "data")
    workdir = str(root / "run")
    checkpoint, batch = first_batch(config, workdir)
    model, _ = experiment.build_model(config, checkpoint)
    return config, model, batch


def micro_streaming(temporal=2, impl="auto", recent=0, placement="auto"):
    """Segments of 2 grids in a buffer of 8, the other settings as named."""
    return streaming.StreamingConfig(
        segment_frames=2,
        hvr=HVRConfig(temporal=temporal, spatial=1, impl=impl),
        recent_segments=recent,
        max_segments=8,
        dvr_placement=placement,
    )


def _full(model, batch, frame_size):
    config = model.llm.config
    arrays = device_batch(batch)
    inputs = batch_inputs(arrays, config, batch_plan(arrays, config, frame_size))
    out = model.llm.forward(inputs, hidden_layers=(-2, -1), logits=False)
    frame_of_token = jnp.where(inputs.attention_mask, arrays["frame_of_token"], -1)
    frames, frame_valid = pool_frame_states(out.hidden_states[-1], frame_of_token, arrays["grid_times"].shape[1])
    cache = KVCache.zeros(config, inputs.input_ids.shape[0], inputs.input_ids.shape[1])
    _, cache, _ = model.llm.prefill(inputs, cache)
    return out, frames, frame_valid, cache


def _stream(model, batch, frame_size, cfg, reloaded=None, hidden_layers=(-2,)):
    config = model.llm.config
    arrays = streaming.split_batch(batch, config, cfg, frame_size)
    b = arrays["prefix_ids"].shape[0]
    layout = streaming.BufferLayout.build(
        cfg, arrays["prefix_ids"].shape[1], arrays["segment_positions"].shape[-1] // cfg.segment_frames
    )
    n = arrays["segment_valid"].shape[1]
    plan = streaming.plan_for(config, cfg, frame_size, b * n)
    reloaded = np.zeros((b, n), bool) if reloaded is None else reloaded
    out = streaming.stream_forward(model.llm, layout, cfg.hvr, arrays, plan, jnp.asarray(reloaded), hidden_layers)
    return arrays, layout, out


def _suffix_rows(values_btx, arrays):
    """Full-sequence rows [B, T, ...] gathered at the suffix positions -> [B, Ts, ...]."""
    index = arrays["suffix_start"][:, None] + np.arange(arrays["suffix_ids"].shape[1])[None]
    index = np.minimum(index, values_btx.shape[1] - 1)
    return np.take_along_axis(np.asarray(values_btx), index.reshape(*index.shape, *[1] * (values_btx.ndim - 2)), 1)


@pytest.mark.parametrize("recent", [0, 2])
def test_unpooled_streaming_equals_the_full_forward(setup, recent):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(temporal=1, recent=recent)
    full, frames, frame_valid, cache = _full(model, batch, frame_size)
    arrays, layout, out = _stream(model, batch, frame_size, cfg)
    valid = arrays["suffix_valid"]
    for got, want in ((out.final, full.last_hidden_state), (out.hidden[-2], full.hidden_states[-2])):
        np.testing.assert_allclose(np.asarray(got)[valid], _suffix_rows(want, arrays)[valid], atol=2e-5)
    g = frames.shape[1]
    np.testing.assert_array_equal(np.asarray(out.frame_valid)[:, :g], np.asarray(frame_valid))
    np.testing.assert_allclose(np.asarray(out.frame_states)[:, :g], np.asarray(frames), atol=2e-5)


def test_hvr_keys_at_r1_are_the_full_forward_cache(setup):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(temporal=1)
    _, _, _, cache = _full(model, batch, frame_size)
    arrays = streaming.split_batch(batch, model.llm.config, cfg, frame_size)
    b, tp = arrays["prefix_ids"].shape
    streamed = streaming.stream_prompt(model.llm, arrays, cfg, frame_size)
    memory = streamed.memory
    valid = np.asarray(memory.valid)
    for r in range(b):
        slots = np.flatnonzero(valid[r])
        n = slots.shape[0]
        # Slots hold prefix then video tokens in order: the same keys/values as the full cache.
        np.testing.assert_allclose(np.asarray(memory.keys)[:, r, slots], np.asarray(cache.keys)[:, r, :n], atol=2e-5)
        np.testing.assert_allclose(
            np.asarray(memory.values)[:, r, slots], np.asarray(cache.values)[:, r, :n], atol=2e-5
        )
        assert n == arrays["suffix_start"][r]


def test_memory_order_does_not_change_the_answer(setup):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming()
    arrays, layout, _ = _stream(model, batch, frame_size, cfg)
    b = arrays["prefix_ids"].shape[0]
    t = model.llm.config.text
    rng = np.random.default_rng(0)
    size = 40
    memory = Memory(
        keys=jnp.asarray(rng.normal(size=(t.num_layers, b, size, t.num_kv_heads, t.head_dim)), jnp.float32),
        values=jnp.asarray(rng.normal(size=(t.num_layers, b, size, t.num_kv_heads, t.head_dim)), jnp.float32),
        valid=jnp.asarray(rng.random((b, size)) < 0.7),
    )
    order = rng.permutation(size)
    shuffled = Memory(memory.keys[:, :, order], memory.values[:, :, order], memory.valid[:, order])
    embeds = model.llm.decoder.embed(arrays["suffix_ids"])
    args = (embeds, jnp.moveaxis(arrays["suffix_positions"], -1, 0), arrays["suffix_valid"])
    a, _, _ = model.llm.decoder.attend(*args, memory)
    c, _, _ = model.llm.decoder.attend(*args, shuffled)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_reloading_every_segment_shows_the_dvr_instead_of_the_hvr(setup):
    """Fine stage with every segment reloaded: the answer sees full-resolution keys everywhere; with
    r = 1 that is again the full forward, while the coarse stage with r = 2 is not."""
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming()
    arrays = streaming.split_batch(batch, model.llm.config, cfg, frame_size)
    n = arrays["segment_valid"].shape[1]
    _, _, coarse = _stream(model, batch, frame_size, cfg)
    _, _, fine = _stream(model, batch, frame_size, cfg, reloaded=np.ones((2, n), bool))
    valid = arrays["suffix_valid"]
    assert np.abs(np.asarray(coarse.final)[valid] - np.asarray(fine.final)[valid]).max() > 1e-3
    # Frame states do not depend on the answer stage.
    np.testing.assert_allclose(np.asarray(coarse.frame_states), np.asarray(fine.frame_states), atol=1e-6)


def test_sharded_streaming_equals_single_device(setup):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(recent=1)
    _, _, single = _stream(model, batch, frame_size, cfg, hidden_layers=(-2,))
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        sharded_state = jax.device_put(state, parallel.state_shardings(state, mesh))
        sharded_model = nnx.merge(graphdef, sharded_state)
        out = jax.jit(lambda: _stream(sharded_model, batch, frame_size, cfg, hidden_layers=(-2,))[2])()
    np.testing.assert_allclose(np.asarray(out.final), np.asarray(single.final), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.frame_states), np.asarray(single.frame_states), atol=2e-5)


def test_generation_over_a_streamed_memory_equals_generation_over_the_whole_prompt(setup, tmp_path):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(temporal=1)
    llm = model.llm
    # Prompts only: cut every row at its response (the loss mask marks it).
    prompt = dict(batch)
    keep = batch["input_ids_mask"] & ~batch["loss_mask"]
    prompt["input_ids_mask"] = keep
    arrays = device_batch(prompt)
    inputs = batch_inputs(arrays, llm.config, batch_plan(arrays, llm.config, frame_size))
    inputs = dataclasses.replace(
        inputs, next_position=jnp.max(jnp.where(keep[None], inputs.positions, -1), axis=(0, 2)) + 1
    )
    sampling_config = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, top_p=1.0)
    want = sampling.generate(llm, inputs, sampling_config, end_ids=[0], hidden_layers=(-2,))

    split = streaming.split_batch(prompt, llm.config, cfg, frame_size)
    streamed = streaming.stream_prompt(llm, split, cfg, frame_size)
    context = streaming.answer_memory(streamed.layout, streamed.memory)
    suffix = dataclasses.replace(
        inputs.__class__.for_text(jnp.asarray(split["suffix_ids"]), jnp.asarray(split["suffix_valid"])),
        positions=jnp.moveaxis(jnp.asarray(split["suffix_positions"]), -1, 0),
        next_position=inputs.next_position,
    )
    got = sampling.generate(llm, suffix, sampling_config, end_ids=[0], hidden_layers=(-2,), memory=context)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.predicting[-2]), np.asarray(want.predicting[-2]), atol=2e-5)


@pytest.mark.parametrize("placement", ["host", "device"])
def test_inference_fine_stage_sees_what_training_saw(setup, placement):
    """The fine-stage memory assembled at inference (streamed steps, DVR kept aside and gathered
    back) gives the suffix the same states as the differentiable training pass."""
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(placement=placement)
    arrays = streaming.split_batch(batch, model.llm.config, cfg, frame_size)
    b, n = arrays["segment_valid"].shape[:2]
    chosen = np.array([[0, 2], [1, -1]])[:b]
    reloaded = np.zeros((b, n), bool)
    for row in range(b):
        reloaded[row, chosen[row][chosen[row] >= 0]] = True
    _, _, trained = _stream(model, batch, frame_size, cfg, reloaded=reloaded)

    streamed = streaming.stream_prompt(model.llm, arrays, cfg, frame_size)
    assert streamed.dvr.placement == placement
    assert (streamed.dvr.host_bytes() > 0) == (placement == "host")
    dvr = streamed.dvr.gather(chosen)
    context = streaming.answer_memory(streamed.layout, streamed.memory, dvr, jnp.asarray(chosen))
    embeds = model.llm.decoder.embed(arrays["suffix_ids"])
    final, _, _ = model.llm.decoder.attend(
        embeds, jnp.moveaxis(arrays["suffix_positions"], -1, 0), arrays["suffix_valid"], context
    )
    valid = arrays["suffix_valid"]
    np.testing.assert_allclose(np.asarray(final)[valid], np.asarray(trained.final)[valid], atol=2e-5)
    np.testing.assert_allclose(streamed.frame_states, np.asarray(trained.frame_states), atol=2e-5)


def test_streamed_memory_is_sharded_by_batch_and_kv_heads(setup):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    cfg = micro_streaming(placement="device")
    arrays = streaming.split_batch(batch, model.llm.config, cfg, frame_size)
    single = streaming.stream_prompt(model.llm, arrays, cfg, frame_size)
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model.llm)
    with jax.set_mesh(mesh):
        llm = nnx.merge(graphdef, jax.device_put(state, parallel.state_shardings(state, mesh)))
        sharded = streaming.stream_prompt(llm, arrays, cfg, frame_size)
    keys = sharded.memory.keys
    # The rules' spec for [layers, batch, cache_time, kv_heads, head_dim] at this shape (axes that
    # do not divide a dimension, like the tiny model's single KV head over tensor=2, are dropped).
    want = parallel.logical_to_spec(CACHE_AXES, keys.shape, mesh)
    assert "fsdp" in str(want[1])
    assert keys.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), keys.ndim), keys.sharding
    np.testing.assert_allclose(np.asarray(sharded.memory.keys), np.asarray(single.memory.keys), atol=2e-5)
    np.testing.assert_allclose(sharded.frame_states, single.frame_states, atol=2e-5)


def test_pallas_kernel_in_interpret_mode_streams_like_the_reference(setup):
    config, model, batch = setup
    frame_size = tuple(config.data.frame_size)
    memories = []
    for impl in ("reference", "pallas_interpret"):
        cfg = micro_streaming(impl=impl)
        arrays = streaming.split_batch(batch, model.llm.config, cfg, frame_size)
        memories.append(streaming.stream_prompt(model.llm, arrays, cfg, frame_size).memory)
    np.testing.assert_allclose(np.asarray(memories[0].keys), np.asarray(memories[1].keys), atol=1e-6)
    np.testing.assert_allclose(np.asarray(memories[0].values), np.asarray(memories[1].values), atol=1e-6)
