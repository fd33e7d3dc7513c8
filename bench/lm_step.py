"""The text-only causal-LM train step (forward + backward + AdamW) that the model benchmarks time."""

from __future__ import annotations

import functools

import jax
import optax
from flax import nnx

from jaxgrounding.model.video_llm import ModelInputs
from jaxgrounding.objectives.lm import next_token_loss


def lm_train_step(model, learning_rate: float = 1e-5):
    """(jitted step(params, opt_state, ids) -> (params, opt_state, loss), params, opt_state);
    params and opt_state are donated."""
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adamw(learning_rate)

    def loss_fn(params, ids):
        m = nnx.merge(graphdef, params)
        inputs = ModelInputs.for_text(ids)
        hidden = m.forward(inputs, logits=False).last_hidden_state
        return next_token_loss(m, hidden, ids, inputs.attention_mask)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, optimizer.init(params)
