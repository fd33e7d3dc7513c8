"""The trainer with the SFT objective on real encoded synthetic batches: accumulation, LoRA dropout keys, NaN stop,
the streamed step through the HVR kernel, methods registered by name."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrounding.training import experiment
from jaxgrounding.grounding_model import batch_inputs, batch_plan, device_batch
from jaxgrounding.training.trainer import PendingMetrics, Trainer
from tests import test_train_timescope
from tests.test_train import first_batch, micro_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    config = micro_config(root / "data")
    workdir = str(root / "run")
    checkpoint, batch = first_batch(config, workdir)
    return config, checkpoint, batch


def _trainer(config, checkpoint, accumulate):
    config = config.copy_and_resolve_references()
    config.train.accumulate = accumulate
    model, tokenizer = experiment.build_model(config, checkpoint)
    return experiment.build_trainer(config, model, tokenizer, checkpoint)


def test_visual_embeddings_land_on_their_placeholders(setup):
    config, checkpoint, batch = setup
    model, _ = experiment.build_model(config, checkpoint)
    arrays = device_batch(batch)
    inputs = batch_inputs(arrays, model.llm.config, batch_plan(arrays, model.llm.config, config.data.frame_size))
    slots = np.asarray(inputs.visual_slots)
    b, t = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(-1)
    real = slots[slots < b * t]
    assert (ids[real] == model.llm.config.video_token_id).all()
    assert len(real) == int(((batch["input_ids"] == model.llm.config.video_token_id) & batch["input_ids_mask"]).sum())


def test_accumulation_of_identical_halves_equals_one_step(setup):
    config, checkpoint, batch = setup
    doubled = {k: (np.concatenate([v, v]) if isinstance(v, np.ndarray) and v.ndim else v) for k, v in batch.items()}
    one = _trainer(config, checkpoint, 1)
    two = _trainer(config, checkpoint, 2)
    m1 = one.step(batch)
    m2 = two.step(doubled)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    a = dict(nnx.to_flat_state(one.trainable))
    b = dict(nnx.to_flat_state(two.trainable))
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key].get_value()), np.asarray(b[key].get_value()), atol=1e-6, err_msg=str(key)
        )


@pytest.mark.parametrize("checkpoint_every, kept", [(1, ["1", "2"]), (4, [])])
def test_non_finite_loss_stops_the_run_without_saving(tmp_path, monkeypatch, checkpoint_every, kept):
    """Metrics are read one step late: a NaN at step 3 is found while step 4 runs (checkpoint_every=4: step 4 is
    not saved, its metrics come first), or at once before a save (checkpoint_every=1); the error names step 3."""
    import os

    from jaxgrounding.train import train_and_evaluate

    config = micro_config(tmp_path / "data")
    config.train.checkpoint_every = checkpoint_every
    real_dispatch = Trainer.dispatch
    calls = {"n": 0}

    def dispatch(self, batch, rng=None, **kwargs):
        calls["n"] += 1
        pending = real_dispatch(self, batch, rng, **kwargs)
        return PendingMetrics(pending.get() | {"loss": float("nan")}, []) if calls["n"] == 3 else pending

    monkeypatch.setattr(Trainer, "dispatch", dispatch)
    with pytest.raises(FloatingPointError, match=r"step 3: loss is nan on samples \['train/"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == kept


def test_lora_dropout_key_is_the_only_randomness_of_a_step(setup):
    """With LoRA input dropout, steps given the same keys reproduce each other exactly; other keys
    change the updates (visible once the zero-initialised B has moved)."""
    config, checkpoint, batch = setup
    config = config.copy_and_resolve_references()
    config.trainable.llm = "lora"
    config.lora.rank = 4
    config.lora.dropout = 0.5

    def third_loss(key):
        # Step 0 of the warmup has learning rate 0, so the keys of steps 0 and 1 shape step 2.
        model, tokenizer = experiment.build_model(config, checkpoint)
        trainer = experiment.build_trainer(config, model, tokenizer, checkpoint)
        trainer.step(batch, rng=key)
        trainer.step(batch, rng=jax.random.fold_in(key, 1))
        return trainer.step(batch, rng=jax.random.key(2))["loss"]

    a, b = third_loss(jax.random.key(1)), third_loss(jax.random.key(1))
    assert a == b
    assert third_loss(jax.random.key(3)) != a
    config.lora.dropout = 0.0  # without dropout the keys change nothing
    assert third_loss(jax.random.key(1)) == third_loss(jax.random.key(3))


def test_streamed_step_through_the_pallas_hvr_kernel_equals_the_reference(tmp_path):
    """TimeScope's streamed step differentiates through HVR pooling; with the Pallas kernel (interpreted here, as it
    runs compiled on GPU/TPU) the loss and every updated parameter equal the jnp reference's step."""
    config = test_train_timescope.micro_config(tmp_path / "data")
    checkpoint, batch = first_batch(config, str(tmp_path / "run"))
    updated = {}
    for impl in ("reference", "pallas_interpret"):
        config.streaming.hvr_impl = impl
        trainer = _trainer(config, checkpoint, 1)
        metrics = trainer.step(batch, step=1)
        updated[impl] = metrics, {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.trainable)}
    (want, want_params), (got, got_params) = updated["reference"], updated["pallas_interpret"]
    assert np.isfinite(got["loss"]) and got["grad_norm"] > 0
    for name in ("loss", "lm_loss", "st_loss", "grad_norm"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    for key, value in want_params.items():
        np.testing.assert_allclose(got_params[key], value, atol=1e-6, err_msg=str(key))


def test_objectives_are_registered_by_method_name(setup):
    from jaxgrounding.training import trainer as trainer_lib
    from jaxgrounding.training.sft import SFT

    config, checkpoint, _ = setup
    model, _ = experiment.build_model(config, checkpoint)
    for method in ("meco", "timescope"):
        assert isinstance(trainer_lib.make_objective(method, config, model.llm.config, checkpoint), SFT)
    with pytest.raises(ValueError, match="config.method='grpo_typo' has no registered objective"):
        trainer_lib.make_objective("grpo_typo", config, model.llm.config, checkpoint)

    @trainer_lib.register_objective("my_method")
    def mine(config, model_config, checkpoint, samples):
        return "an objective"

    try:
        assert trainer_lib.make_objective("my_method", config, model.llm.config, checkpoint) == "an objective"
        with pytest.raises(ValueError, match="already has an objective"):
            trainer_lib.register_objective("my_method")(mine)
    finally:
        trainer_lib._OBJECTIVES.pop("my_method")


def test_streamed_batch_of_the_pipeline_gives_the_loss_of_the_host_cut(tmp_path):
    """The streamed transform's batch (cut per example in the pipeline, reloads drawn per sample and epoch) gives the
    loss that cutting the padded flat batch on the host (`split_batch`) with the same reloads gives."""
    from jaxgrounding import data as data_lib
    from jaxgrounding import settings
    from jaxgrounding.memory import streaming as streaming_lib
    from jaxgrounding.tasks.encoding import EncoderConfig, StructuralEncoder

    config = test_train_timescope.micro_config(tmp_path / "data")
    config.coarse_to_fine.fine_fraction = 1.0  # every sample reloads some segments' DVR
    checkpoint, streamed = first_batch(config, str(tmp_path / "run"))
    train, _ = experiment.load_samples(config, str(tmp_path / "run"))
    encoder = StructuralEncoder(checkpoint, EncoderConfig.from_config(config, train=True))
    pipeline = settings.pipeline_config(config, train=True, batch_size=2)
    flat = next(iter(data_lib.make_pipeline(train, pipeline, encoder)))
    assert flat["id"].tolist() == streamed["id"].tolist()

    model, _ = experiment.build_model(config, checkpoint)
    objective = _trainer(config, checkpoint, 1).objective
    cut = streaming_lib.split_batch(flat, model.llm.config, objective.config.streaming, tuple(config.data.frame_size))
    n = cut["segment_valid"].shape[1]
    reloaded = np.zeros((2, n), bool)
    reloaded[:, : min(n, streamed["reloaded"].shape[1])] = streamed["reloaded"][:, :n]
    assert reloaded.sum() == streamed["reloaded"].sum() and reloaded.any(axis=1).all()
    host = cut | {"reloaded": reloaded} | {k: flat[k] for k in ("struct_kinds", "struct_kinds_mask", "struct_ranges", "valid")}

    def loss(batch):
        arrays, _ = objective.host_arrays(batch, 0)
        plan, loss_fn = objective.prepare(arrays, 2)
        return jax.device_get(loss_fn(model, arrays, plan, None)[1])

    want, got = loss(host), loss(streamed)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
