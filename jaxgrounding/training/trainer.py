"""One trainer for every method: the train state and the jitted update; the method's loss is a parameter.

A method (SFT: MeCo's LM + L_ST, TimeScope's streamed version; GRPO: Invert4TVG) is an `Objective`:

- `start(model, mesh)`: once, before the first step (GRPO keeps its reference policy and the mesh its rollouts
  run on);
- `host_arrays(batch, step, policy, skip)`: this process's rows of the global batch -> (numeric host arrays, host
  metrics): the method's host-side work, e.g. GRPO's rollouts with the current model `policy()`, rewards and
  advantages (SFT's batches arrive ready: per-sample preparation, streamed cuts included, is the pipeline's).
  A sample it cannot use is dropped and handed to `skip([(sample, stage, reason)])` (the data pipeline's failure
  count; None: raise `DataFailureError`); with no usable sample on some process, arrays are None on every process
  (agreed) and the step makes no update;
- `updates_per_batch`: optimizer updates on one batch of host arrays (GRPO's `num_iterations`; SFT: 1);
- `prepare(arrays, micro_batch)`: from the global-shaped arrays, the vision plan and the loss to trace, a hashable
  (frozen) callable `loss(model, arrays, plan, key) -> (total, metrics)`. Being a static argument of the jitted
  step, everything the trace depends on is in it or in the arrays: no state of the trainer is read by the trace.

`Trainer` owns the rest, the same for every method: the split of the model into trainable and frozen parameters
(`optim.trainable_filter`), the optimizer and its state (parameter groups, clipping, schedules: `optim`), the
jitted step with donated state, gradient accumulation over micro-batches (a `lax.scan`, so memory is one
micro-batch), the embedding-row mask for new tokens, and the multi-process entry of the batch (`parallel`).

Methods are registered by name (`register_objective`), so a user adds one without editing the trainer; `train.py`
picks the config's `method`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.grounding_model import GroundingModel
from jaxgrounding.training import optim


class Loss(Protocol, Hashable):
    def __call__(self, model: GroundingModel, arrays: dict, plan: Any, key: jax.Array | None) -> tuple[Any, dict]: ...


class Objective(Protocol):
    updates_per_batch: int

    def start(self, model: GroundingModel, mesh: jax.sharding.Mesh | None) -> None: ...

    def host_arrays(
        self, batch: dict, step: int, policy: Callable[[], GroundingModel], skip: Callable | None = None
    ) -> tuple[dict[str, np.ndarray] | None, dict]: ...

    def prepare(self, arrays: dict[str, np.ndarray], micro_batch: int) -> tuple[Any, Loss]: ...


_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(*methods: str):
    """Registers `factory(config, model_config, checkpoint, samples) -> Objective` for the config `method` names
    (checkpoint: the base checkpoint directory, for the tokenizer; samples: the training samples)."""

    def register(factory):
        for method in methods:
            if method in _OBJECTIVES:
                raise ValueError(f"method {method!r} already has an objective: {_OBJECTIVES[method]}")
            _OBJECTIVES[method] = factory
        return factory

    return register


def make_objective(method: str, config, model_config, checkpoint: str, samples=()) -> Objective:
    """The registered objective of `method`, built from the run's config."""
    if method not in _OBJECTIVES:
        raise ValueError(f"config.method={method!r} has no registered objective; known: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[method](config, model_config, checkpoint, samples)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    accumulate: int  # micro-batches per update
    trainable: optim.TrainableConfig
    optimizer: optim.OptimizerConfig

    @classmethod
    def from_config(cls, config) -> TrainerConfig:
        return cls(
            accumulate=config.train.accumulate,
            trainable=optim.TrainableConfig.from_config(config),
            optimizer=optim.OptimizerConfig.from_config(config),
        )


class Trainer:
    """The train state (trainable params, optimizer state; frozen params are never copied into the optimizer) and
    the jitted update for `objective`. `step(batch)` returns host metrics; `model()` reassembles the model."""

    def __init__(
        self, model: GroundingModel, objective: Objective, config: TrainerConfig, new_token_ids=(), mesh=None
    ):
        self.objective = objective
        self.config = config
        self.mesh = mesh
        objective.start(model, mesh)
        self.graphdef, self.trainable, self.frozen = nnx.split(model, optim.trainable_filter(config.trainable), ...)
        if not jax.tree.leaves(self.trainable):
            raise ValueError("nothing to train: the trainable filter selected no parameters")
        self.optimizer = optim.make_optimizer(config.optimizer, self.trainable)
        # An abstract model (nnx.eval_shape) gets an abstract optimizer state: compile-only uses.
        abstract = isinstance(jax.tree.leaves(self.trainable)[0], jax.ShapeDtypeStruct)
        init = jax.eval_shape if abstract else (lambda f, x: f(x))
        self.opt_state = init(self.optimizer.init, self.trainable)
        mask_rows = config.trainable.llm != "full" and config.trainable.embeddings == "new_tokens"
        self._row_mask = (tuple(int(i) for i in new_token_ids), mask_rows)
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1), static_argnames=("loss",))

    def model(self) -> GroundingModel:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def _train_step(self, trainable, opt_state, frozen, arrays, plan, key_data, *, loss):
        key = None if key_data is None else jax.random.wrap_key_data(key_data)

        def loss_of(trainable, arrays, key):
            return loss(nnx.merge(self.graphdef, trainable, frozen), arrays, plan, key)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        accumulate = self.config.accumulate
        if accumulate == 1:
            (_, metrics), grads = grad_fn(trainable, arrays, key)
        else:
            # [B, ...] -> [A, B / A, ...]; the vision plan is per micro-batch already.
            micro = jax.tree.map(lambda x: x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:]), arrays)

            def body(acc, xs):
                mb, i = xs
                micro_key = None if key is None else jax.random.fold_in(key, i)
                (_, m), g = grad_fn(trainable, mb, micro_key)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            first = jax.tree.map(lambda x: x[0], micro)
            zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(trainable, first, key)[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_metrics), (micro, jnp.arange(accumulate)))
            grads = jax.tree.map(lambda g: g / accumulate, grads)
            metrics = jax.tree.map(lambda m: m / accumulate, metrics)
        grads = optim.mask_token_rows(grads, *self._row_mask)
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    def lower(self, arrays: dict, rng=None):
        """`jax.jit(...).lower` of the train step for global `arrays` (arrays or ShapeDtypeStructs): compile-only
        memory analysis without the data."""
        plan, loss = self.objective.prepare(arrays, np.shape(arrays["valid"])[0] // self.config.accumulate)
        key_data = None if rng is None else jax.random.key_data(rng)
        return self._step.lower(self.trainable, self.opt_state, self.frozen, arrays, plan, key_data, loss=loss)

    def step(self, batch: dict, rng=None, *, step: int = 0, skip: Callable | None = None) -> dict[str, float]:
        """`dispatch(...)` and wait for its metrics: the synchronous form (tests, benchmarks)."""
        return self.dispatch(batch, rng, step=step, skip=skip).get()

    def dispatch(self, batch: dict, rng=None, *, step: int = 0, skip: Callable | None = None) -> PendingMetrics:
        """`objective.updates_per_batch` updates on this process's rows `batch` of the global batch, dispatched
        without waiting for the device: returns the step's `PendingMetrics` (the objective's host metrics and the
        updates' mean metrics once `get()` fetches them). The train loop fetches step k's metrics after step k+1
        is dispatched, so the device never idles while the host reads a loss.

        rng: this step's key (LoRA input dropout; None: no dropout), the same on every process; step: the step being
        taken (seeds what the objective draws per step: GRPO's task). The train loop derives both from the run, so a
        resumed run draws the same; skip: where the objective reports samples it could not use (the pipeline
        iterator's `skip`). A step whose batch had nothing usable has the objective's metrics only (no "loss":
        no update).
        """
        b = batch["valid"].shape[0]
        if b % self.config.accumulate:
            raise ValueError(f"batch size {b} is not divisible by accumulate={self.config.accumulate}")
        # Shapes first (processes pad their rows to their own buckets), then the plan from them; the plan is for
        # one micro-batch of the global batch.
        tick = time.perf_counter()
        arrays, host_metrics = self.objective.host_arrays(batch, step, self.model, skip)
        host_metrics = host_metrics | {"host_seconds": time.perf_counter() - tick}
        if arrays is None:
            return PendingMetrics(host_metrics, [])
        arrays = parallel.agree_shapes(arrays)
        plan, loss = self.objective.prepare(arrays, b * jax.process_count() // self.config.accumulate)
        if self.mesh is not None:
            arrays = parallel.global_batch(arrays, self.mesh)
        updates = []
        for i in range(self.objective.updates_per_batch):
            key_data = None
            if rng is not None:
                key_data = host_key_data(rng, i)
                if self.mesh is not None:
                    key_data = parallel.replicated(key_data, self.mesh)
            self.trainable, self.opt_state, metrics = self._step(
                self.trainable, self.opt_state, self.frozen, arrays, plan, key_data, loss=loss
            )
            updates.append(metrics)
        return PendingMetrics(host_metrics, updates)


class PendingMetrics:
    """One step's metrics: the host's now, the device's (arrays of updates still running) on `get()`."""

    def __init__(self, host_metrics: dict, updates: list):
        self._host, self._updates, self._value = host_metrics, updates, None

    @property
    def has_updates(self) -> bool:
        """False for a step that made no update (nothing in its batch was usable)."""
        return bool(self._updates)

    def get(self) -> dict[str, float]:
        """The objective's host metrics and the updates' mean metrics (blocks until the updates are done)."""
        if self._value is None:
            updates = jax.device_get(self._updates)
            mean = {k: float(np.mean([u[k] for u in updates])) for k in updates[0]} if updates else {}
            self._value, self._updates = self._host | mean, []
        return self._value


def host_key(rng) -> jax.Array:
    """`rng` on the host's CPU backend: keys derived from it there (`fold_in`) never wait for the accelerator."""
    return jax.device_put(rng, jax.local_devices(backend="cpu")[0])


def host_key_data(rng, i: int = 0) -> np.ndarray:
    """The raw data of `fold_in(rng, i)` (rng itself for i == 0), computed on the host's CPU backend: the same bits
    (threefry is exact everywhere) without queueing behind the accelerator's running step and waiting for it."""
    cpu = jax.local_devices(backend="cpu")[0]
    # Out of the train step's mesh, whose devices the CPU key is not on.
    with jax.set_mesh(None), jax.default_device(cpu):
        key = host_key(rng)
        return np.asarray(jax.random.key_data(key if i == 0 else jax.random.fold_in(key, i)))
