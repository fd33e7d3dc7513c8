"""Accelerator precision (`model.compute_dtype = "bfloat16"` over float32 weights): the forward stays within a
measured bound of float32 on the parity batches, and the numerically sensitive parts run in float32."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrounding.model as jm
from jaxgrounding.objectives.lm import next_token_loss
from tests.model import hf_reference as ref
from tests.model.test_video_llm import BATCHES

# Measured (tiny random Qwen2.5-VL and Qwen2-VL, every parity batch): max |logit diff| / max |logit| 0.0079,
# log-prob max 0.0052 and mean 0.0009 nats. Asserted with a 2x margin. The random model's logits are small
# (|logit| < 0.75), so the log-prob figures say little about a trained model's; the relative bound does.
MAX_RELATIVE_LOGIT_DIFF = 0.015
MAX_LOGPROB_DIFF = 0.01
MEAN_LOGPROB_DIFF = 0.002


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_5_vl"))
    ref.build_reference("qwen2_5_vl", path)
    fp32 = jm.from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.float32)
    mixed = jm.from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    return fp32, mixed


def _batch(model, name):
    batch = ref.make_batch(BATCHES[name], rng=np.random.default_rng(1), patch_dim=model.config.vision.patch_dim)
    return ref.ours_inputs(batch)


@pytest.mark.parametrize("batch_name", ["mixed"])
def test_bfloat16_compute_stays_within_the_bound_of_float32(models, batch_name):
    fp32, mixed = models
    batch = _batch(fp32, batch_name)
    want = np.asarray(fp32(**batch).logits)
    got = mixed(**batch).logits
    assert got.dtype == jnp.float32  # logits are accumulated in float32 whatever the compute dtype
    got = np.asarray(got)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(got - want)[valid].max() <= MAX_RELATIVE_LOGIT_DIFF * np.abs(want[valid]).max()
    logprob_diff = np.abs(np.asarray(jax.nn.log_softmax(got) - jax.nn.log_softmax(want)))[valid]
    assert logprob_diff.max() <= MAX_LOGPROB_DIFF
    assert logprob_diff.mean() <= MEAN_LOGPROB_DIFF


def _primitives(jaxpr, counts):
    """(primitive, input dtypes, output dtypes) -> count over `jaxpr` and every jaxpr nested in it."""
    for eqn in jaxpr.eqns:
        ins = tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))
        outs = tuple(str(v.aval.dtype) for v in eqn.outvars)
        counts[(eqn.primitive.name, ins, outs)] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _primitives(sub.jaxpr, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _primitives(sub, counts)
    return counts


def test_matmuls_run_in_bfloat16_and_statistics_in_float32(models):
    _, mixed = models
    batch = _batch(mixed, "video")
    inputs = jm.prepare_inputs(mixed.config, **batch)

    def loss(model):
        out = model.forward(inputs, logits=False)
        return next_token_loss(model, out.last_hidden_state, inputs.input_ids, inputs.attention_mask)[0]

    closed = jax.make_jaxpr(loss)(mixed)
    assert closed.out_avals[0].dtype == jnp.float32
    counts = _primitives(closed.jaxpr, collections.Counter())
    dots = [(ins, outs) for (name, ins, outs) in counts if name == "dot_general"]
    assert dots and all(ins == ("bfloat16", "bfloat16") for ins, _ in dots), dots
    # Attention logits (tower and decoder) and the LM head accumulate in float32.
    assert ("float32",) in {outs for _, outs in dots}
    # Softmax (exp, max), log-softmax (log), norms (rsqrt) and rotary (cos, sin): float32 only.
    sensitive = [k for k in counts if k[0] in ("exp", "log", "reduce_max", "rsqrt", "cos", "sin")]
    assert {k[0] for k in sensitive} == {"exp", "log", "reduce_max", "rsqrt", "cos", "sin"}
    assert all(k[1] == ("float32",) and k[2] == ("float32",) for k in sensitive), sensitive
