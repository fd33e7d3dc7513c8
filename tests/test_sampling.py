"""Generation with the KV cache against a loop of full forward passes, and sampling filters; RL
rollouts: G samples per prompt from one prefill equal G independent generations, their
log-probabilities equal a teacher-forced forward, adapters off is the base model, and the fan-out
over a memory equals the fan-out over the whole prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding import sampling
from jaxgrounding.model.decoder import Memory
from jaxgrounding.model.lora import adapters_disabled, apply_lora
from jaxgrounding.objectives import lm
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q25"))
    ref.build_reference("qwen2_5_vl", path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return jm.from_pretrained(checkpoint)


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
        model,
        inputs,
        sampling.SamplingConfig(max_new_tokens=steps, temperature=0.0, top_p=1.0),
        end_ids=[299],
        hidden_layers=(-2,),
        return_logprobs=True,
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
            # greedy: the log-probability under the raw logits
            logp = np.asarray(jax.nn.log_softmax(out.logits[0, -1]))[want]
            np.testing.assert_allclose(float(gen.logprobs[b, k]), logp, atol=1e-5)
            np.testing.assert_allclose(
                np.asarray(gen.predicting[-2])[b, k], np.asarray(out.hidden_states[-2])[0, -1], atol=1e-4
            )
            seq.append(want)


def test_generation_stops_at_end_token(model):
    inputs = jm.prepare_inputs(model.config, np.array([[5, 6, 7]]))
    first = int(
        sampling.generate(
            model, inputs, sampling.SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0), end_ids=[299]
        ).tokens[0, 0]
    )
    gen = sampling.generate(
        model, inputs, sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, top_p=1.0), end_ids=[first]
    )
    assert int(gen.lengths[0]) == 1
    assert (np.asarray(gen.tokens)[0] == first).all()  # the end token repeats after the stop


def test_top_k_and_top_p_filters():
    """400 draws from one distribution, one per column with its own key, as `generate` draws them."""
    logits_vr = jnp.tile(jnp.log(jnp.array([[0.5], [0.3], [0.15], [0.05]])), (1, 400))
    keys = jax.random.split(jax.random.key(0), 400)

    def draw(temperature, top_k=0, top_p=1.0):
        config = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
        return np.asarray(sampling._sample_columns(logits_vr, keys, config))

    assert set(draw(1.0, top_k=2)) <= {0, 1}
    assert set(draw(1.0, top_p=0.7)) <= {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draw(1.0, top_p=0.5)) == {0}
    np.testing.assert_allclose(np.bincount(draw(1.0), minlength=4) / 400, [0.5, 0.3, 0.15, 0.05], atol=0.07)
    assert set(draw(0.0)) == {0}


@pytest.mark.parametrize("top_k,top_p", [(7, 1.0), (0, 0.9), (50, 0.6), (0, 0.05)])
def test_sort_free_filters_keep_what_sorting_keeps(top_k, top_p):
    """The bisection thresholds (vocabulary-major, no sort) keep exactly the tokens a sort keeps."""
    rng = np.random.default_rng(top_k)
    logits = (3.0 * rng.standard_normal((1000, 6))).astype(np.float32)  # [V, R]
    config = sampling.SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=64)
    kept = np.isfinite(np.asarray(jax.jit(sampling._filter, static_argnums=1)(jnp.asarray(logits), config)))
    for r in range(logits.shape[1]):
        scaled = logits[:, r].astype(np.float64) / 0.7
        order = np.argsort(-scaled)
        keep = np.zeros(len(scaled), bool)
        keep[order[: top_k or len(scaled)]] = True
        probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
        probs = probs[order] / probs.sum()
        keep[order] &= np.cumsum(probs) - probs < top_p
        np.testing.assert_array_equal(kept[:, r], keep)


# ----------------------------------------------------------------------------------------------
# RL rollouts: G samples per prompt from one prefill, log-probabilities, adapters off, memory
# ----------------------------------------------------------------------------------------------

ROLLOUT = sampling.SamplingConfig(max_new_tokens=5, temperature=0.8, top_k=40, top_p=1.0)
# A third of the vocabulary ends a row, so rows stop at different lengths and the mask matters.
ROLLOUT_ENDS = list(range(3, 100))


@pytest.fixture(scope="module")
def video_prompts(model):
    """Two left-padded prompts, the first with a video."""
    samples = [[("text", 3), ("video", (2, 4, 8), 1.0), ("text", 2)], [("text", 6)]]
    batch = ref.make_batch(samples, rng=np.random.default_rng(1), patch_dim=model.config.vision.patch_dim)
    return batch, jm.prepare_inputs(model.config, **ref.ours_inputs(batch))


@pytest.fixture(scope="module")
def fan_out(model, video_prompts):
    _, inputs = video_prompts
    return sampling.generate(
        model,
        inputs,
        ROLLOUT,
        end_ids=ROLLOUT_ENDS,
        rng=jax.random.key(3),
        num_samples=3,
        return_logprobs=True,
        hidden_layers=(-2,),
        prompt_layers=(-1,),
    )


def test_fan_out_equals_independent_generations_with_the_same_keys(model, video_prompts, fan_out):
    _, inputs = video_prompts
    g = 3
    assert fan_out.tokens.shape == (2 * g, 5) and fan_out.prompt_hidden[-1].shape[0] == 2
    assert 1 < len(set(map(tuple, np.asarray(fan_out.tokens)))) and np.asarray(fan_out.lengths).min() < 5
    keys = sampling.sample_keys(jax.random.key(3), g)
    for s in range(g):
        one = sampling.generate(
            model,
            inputs,
            ROLLOUT,
            end_ids=ROLLOUT_ENDS,
            rng=keys[s : s + 1],
            return_logprobs=True,
            hidden_layers=(-2,),
        )
        rows = np.arange(2) * g + s  # row p * G + g: sample g of prompt p
        np.testing.assert_array_equal(np.asarray(fan_out.tokens)[rows], np.asarray(one.tokens))
        np.testing.assert_array_equal(np.asarray(fan_out.lengths)[rows], np.asarray(one.lengths))
        np.testing.assert_allclose(np.asarray(fan_out.logprobs)[rows], np.asarray(one.logprobs), atol=1e-5)
        np.testing.assert_allclose(np.asarray(fan_out.predicting[-2])[rows], np.asarray(one.predicting[-2]), atol=1e-5)


def test_logprobs_equal_a_teacher_forced_forward(model, video_prompts, fan_out):
    """Each sampled token's log-probability is log_softmax(logits / T) at it (before top-k) in one
    full forward over prompt + completion, and `lm.token_logprobs` reads the same numbers
    from that forward's hidden states."""
    batch, _ = video_prompts
    g, n = 3, ROLLOUT.max_new_tokens
    tokens, lengths = np.asarray(fan_out.tokens), np.asarray(fan_out.lengths)
    mask = np.asarray(fan_out.mask)
    np.testing.assert_array_equal(mask, np.arange(n)[None] < lengths[:, None])
    prompt_lengths = batch["attention_mask"].sum(1)
    width = prompt_lengths.max() + n
    ids = np.zeros((2 * g, width), np.int64)  # right padded: prompt, then the completion
    valid = np.zeros((2 * g, width), bool)
    for r in range(2 * g):
        p, k = r // g, prompt_lengths[r // g]
        seq = np.concatenate([batch["input_ids"][p, -k:], tokens[r, : lengths[r]]])
        ids[r, : len(seq)], valid[r, : len(seq)] = seq, True
    video = dict(
        pixel_values_videos=np.concatenate([batch["pixel_values_videos"]] * g),
        video_grid_thw=np.repeat(batch["video_grid_thw"], g, axis=0),
        second_per_grid_ts=np.repeat(batch["second_per_grid_ts"], g),
    )
    out = model(input_ids=ids, attention_mask=valid, **video)
    logp = np.asarray(jax.nn.log_softmax(out.logits / ROLLOUT.temperature, axis=-1))
    shared = np.asarray(
        lm.token_logprobs(
            out.last_hidden_state[:, :-1],
            lm.lm_head_matrix(model),
            jnp.asarray(ids[:, 1:]),
            temperature=ROLLOUT.temperature,
        )
    )
    for r in range(2 * g):
        at = prompt_lengths[r // g] - 1 + np.arange(lengths[r])  # the state that predicted each token
        want = logp[r, at, tokens[r, : lengths[r]]]
        np.testing.assert_allclose(np.asarray(fan_out.logprobs)[r, : lengths[r]], want, atol=1e-5)
        np.testing.assert_allclose(shared[r, at], want, atol=1e-5)
    assert (np.asarray(fan_out.logprobs)[~mask] == 0).all()


def test_generation_with_adapters_off_equals_the_base_model(model, checkpoint):
    adapted = jm.from_pretrained(checkpoint)
    apply_lora(adapted, rank=4, alpha=8.0)
    adapters = nnx.state(adapted, nnx.LoRAParam)
    nnx.update(adapted, jax.tree.map(lambda x: x + 0.05, adapters))  # nonzero B: the adapters matter
    ids = np.random.default_rng(4).integers(3, 280, size=(2, 7))
    inputs = jm.prepare_inputs(model.config, ids)
    config = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0, top_p=1.0)
    run = lambda m: sampling.generate(m, inputs, config, end_ids=[], return_logprobs=True)
    base = run(model)
    with adapters_disabled(adapted):
        off = run(adapted)
    on = run(adapted)
    np.testing.assert_array_equal(np.asarray(off.tokens), np.asarray(base.tokens))
    np.testing.assert_allclose(np.asarray(off.logprobs), np.asarray(base.logprobs), atol=1e-5)
    assert np.abs(np.asarray(on.logprobs) - np.asarray(base.logprobs)).max() > 1e-3
    # With the adapters on, generation (adapters folded once per call) is the adapted model.
    tokens = np.asarray(on.tokens)
    logits = adapted(input_ids=np.concatenate([ids, tokens[:, :-1]], axis=1)).logits[:, ids.shape[1] - 1 :]
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, axis=-1)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(on.logprobs), want, atol=1e-5)


def test_fan_out_over_a_memory_equals_the_fan_out_over_the_whole_prompt(model):
    """The prefix as a hand-made `Memory` (keys rotated by a prefill, slots shuffled: a memory is
    unordered) and the suffix as the prompt sample what the whole prompt samples."""
    config = model.config
    rng = np.random.default_rng(5)
    b, tp, ts, g = 2, 6, 3, 3
    prefix = rng.integers(3, 280, size=(b, tp))
    prefix_mask = np.ones((b, tp), bool)
    prefix_mask[1, :2] = False  # the second prefix is left padded
    suffix = rng.integers(3, 280, size=(b, ts))
    graphdef, state = nnx.split(model)
    prefix_inputs = jm.prepare_inputs(config, prefix, prefix_mask)
    _, cache, _ = jm.prefill(graphdef, state, prefix_inputs, jm.KVCache.zeros(config, b, tp))
    order = rng.permutation(tp)
    memory = Memory(cache.keys[:, :, order], cache.values[:, :, order], cache.key_valid[:, order])
    start = np.asarray(prefix_inputs.next_position)[:, None] + np.arange(ts)
    suffix_inputs = jm.ModelInputs(
        input_ids=suffix,
        attention_mask=np.ones((b, ts), bool),
        positions=np.broadcast_to(start, (3, b, ts)).astype(np.int32),
        next_position=(start[:, -1] + 1).astype(np.int32),
    )
    whole_mask = np.concatenate([prefix_mask, np.ones((b, ts), bool)], 1)
    whole = jm.prepare_inputs(config, np.concatenate([prefix, suffix], 1), whole_mask)
    kw = dict(end_ids=ROLLOUT_ENDS, rng=jax.random.key(6), num_samples=g, return_logprobs=True, hidden_layers=(-2,))
    got = sampling.generate(model, suffix_inputs, ROLLOUT, memory=memory, **kw)
    want = sampling.generate(model, whole, ROLLOUT, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.predicting[-2]), np.asarray(want.predicting[-2]), atol=1e-5)
