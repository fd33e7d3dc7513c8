"""LoRA adapters (Hu et al., 2021) on the decoder's projections.

W' = W + (alpha / r) * A @ B with A: [in..., r] ~ N(0, 1/r) and B: [r, out...] = 0, so an adapted
model starts equal to the base one. Adapters are `nnx.LoRAParam` variables, which makes "train
only the adapters" a type filter, and the frozen base weights are the reference policy for
GRPO's KL term without a second copy of the model.

The adapter is folded into the kernel before the matmul (one [in, out] add per layer per step)
rather than run as two extra matmuls: with our layer scan the kernel is already sliced per
layer, and the fold keeps the activation path identical to the base model's.

Dropout on the adapter input (MeCo: 0.05) applies only when a training step passes a dropout
key (`VideoLLM.forward(dropout_key=...)`): the adapter then runs as its own two matmuls on the
dropped input, since a folded kernel cannot see a different input than the base weights. Without
a key (evaluation, generation) the fold is exact.

qwix was considered and not used: it rewrites modules by interception, which does not see
through our `nnx.vmap`-stacked layers.

`adapters_disabled(model)` switches every adapter off for the calls made inside it: the same
parameters then run as the base model (GRPO's reference policy), with no second copy of the
weights. The switch is a static attribute, so a jitted function traced inside the context (or
`nnx.split` there) compiles the base model, and one traced outside compiles the adapted one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model import layers

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _targets(model, targets: Sequence[str]):
    attn = model.decoder.layers.self_attn
    mlp = model.decoder.layers.mlp
    found = {}
    for name in targets:
        module = getattr(attn, name, None) or getattr(mlp, name, None)
        if not isinstance(module, (layers.Linear, layers.OutLinear)):
            raise ValueError(f"LoRA target {name!r} is not a projection of the decoder layers")
        found[name] = module
    return found


def apply_lora(
    model,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    seed: int = 0,
) -> None:
    """Attaches zero-initialised adapters to `targets` of every decoder layer (in place);
    `dropout`: rate on the adapter input during training."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    key = jax.random.key(seed)
    for i, (name, module) in enumerate(_targets(model, targets).items()):
        kernel = module.kernel[...]
        num_layers = kernel.shape[0]
        if isinstance(module, layers.OutLinear):
            in_shape, out_shape = kernel.shape[1:-1], kernel.shape[-1:]
        else:
            in_shape, out_shape = kernel.shape[1:2], kernel.shape[2:]
        axes = module.kernel.get_metadata()["logical_axes"]
        a = jax.random.normal(jax.random.fold_in(key, i), (num_layers, *in_shape, rank), kernel.dtype) / rank**0.5
        module.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[: 1 + len(in_shape)], None))
        module.lora_b = nnx.LoRAParam(
            jnp.zeros((num_layers, rank, *out_shape), kernel.dtype),
            logical_axes=("layers", None, *axes[-len(out_shape) :]),
        )
        module.lora_scale = alpha / rank
        module.lora_dropout = float(dropout)


def merge_lora(model) -> None:
    """Folds every adapter into its kernel and removes it (before export)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (layers.Linear, layers.OutLinear)) and module.lora_a is not None:
            a, b = module.lora_a[...], module.lora_b[...]
            if isinstance(module, layers.OutLinear):
                delta = jnp.einsum("l...r,lro->l...o", a, b)
            else:
                delta = jnp.einsum("lir,lr...->li...", a, b)
            module.kernel.set_value((module.kernel[...] + module.lora_scale * delta).astype(module.kernel[...].dtype))
            module.lora_a = nnx.data(None)
            module.lora_b = nnx.data(None)
            module.lora_scale = 1.0
            module.lora_dropout = 0.0


def _adapted_modules(model) -> list:
    return [
        module
        for _, module in nnx.iter_graph(model)
        if isinstance(module, (layers.Linear, layers.OutLinear)) and module.lora_a is not None
    ]


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator:
    """Runs `model` as its base model inside the block: every attached adapter is switched off and
    switched back on when the block ends (also on error). A model without adapters is unchanged.

        with adapters_disabled(model):
            reference = model.forward(inputs, logits=False)   # the frozen base weights only

    Inside a jitted function, use it on the model merged there (`nnx.merge(graphdef, state)`): as for any
    NNX module, a model built outside a trace cannot be mutated inside it.
    """
    modules = _adapted_modules(model)
    before = [module.lora_enabled for module in modules]
    for module in modules:
        module.lora_enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(modules, before):
            module.lora_enabled = enabled
