"""Train a grounding model, checkpoint it, evaluate it.

    python -m jaxgrounding.train --config configs/meco.py --workdir runs/meco [--config.a.b=value ...]

The workdir gets: run.lock while a run holds it (a second launch refuses), config.json (the resolved
config, written once the run has started), checkpoints/ (Orbax; a run started on a workdir with
checkpoints resumes from the newest good one, with the same model and data config), tb/
(TensorBoard events), train_metrics.jsonl (one line per logged step, one step behind the running step; a
resume replaces the rows of the steps it replays), eval/metrics.json and eval/predictions.jsonl, export/.
The workdir may be an object-store URL (gs://bucket/run, with the `cloud` extra): every file goes through
`jaxgrounding.paths`, and what must be local (the tiny model, the synthetic videos) is kept in a local cache.
A GRPO config with `warm_start.steps` first trains its supervised warm start in workdir/warm_start
(evaluated into workdir/eval_init), then starts GRPO from that model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time

import jax
import numpy as np
import tqdm
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from jaxgrounding import data as data_lib
from jaxgrounding import evaluation, parallel, paths, settings
from jaxgrounding.training import experiment
from jaxgrounding.training import checkpoint as checkpoint_lib
from jaxgrounding.training import trainer as trainer_lib
from jaxgrounding.training import workdir as workdir_lib
from jaxgrounding.training.checkpoint import Checkpointer, TrainState

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:presets]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation.", required=True)
flags.mark_flag_as_required("config")

log = logging.getLogger(__name__)
# Metrics on the progress bar, besides every "*_loss": SFT's loss, GRPO's reward and KL.
_SHOWN = ("loss", "reward", "kl")


def check_config(config) -> None:
    """Raises ValueError for settings no run can use, saying what is allowed (before anything is built)."""
    problems = []
    for key in ("train.steps", "train.batch_size", "train.accumulate", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "eval.batch_size"):
        section, name = key.split(".")
        value = config[section][name]
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r}: must be an integer >= 1")
    try:
        settings.model_dtypes(config)
    except ValueError as e:
        problems.append(str(e))
    if not 0.0 <= config.data.max_failure_fraction <= 1.0:
        problems.append(f"data.max_failure_fraction={config.data.max_failure_fraction!r}: must be in [0, 1]")
    if config.data.on_bad_line not in ("raise", "skip"):
        problems.append(f"data.on_bad_line={config.data.on_bad_line!r}: must be 'raise' or 'skip'")
    if "answer" in config:
        if config.answer.format not in ("timestamps", "structural"):
            problems.append(f"answer.format={config.answer.format!r}: must be 'timestamps' or 'structural'")
        elif config.answer.format == "structural" and config.grpo.grounding_prob != 1.0:
            problems.append(
                f"grpo.grounding_prob={config.grpo.grounding_prob}: answer.format='structural' trains grounding only "
                "(the inversion tasks answer in text); set it to 1.0"
            )
        elif config.answer.format == "structural" and config.memory == "streaming":
            problems.append("answer.format='structural' with memory='streaming': not supported (use 'timestamps')")
    if config.encoder.frame_time_text and config.memory == "streaming":
        problems.append("encoder.frame_time_text=True: not supported with memory='streaming' (segments carry no text)")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _tensorboard_name(name: str) -> str:
    # TensorBoard accepts [A-Za-z0-9_.\-/] in tags and warns on the rest ("eval/R1@0.5").
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def train_and_evaluate(config, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) training, then evaluates. `stop_after` ends the run after that step
    without evaluation, as a kill would (used to test resumption); it saves only on schedule."""
    check_config(config)
    experiment.checkpoint_name(config)  # a real model preset without a checkpoint stops here
    paths.makedirs(workdir)
    # One process takes the workdir for the whole run (the warm start's workdir is inside it).
    with workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir, stop_after)


def _train_and_evaluate(config, workdir: str, stop_after: int | None) -> dict:
    if "warm_start" in config and config.warm_start.steps:
        warm_workdir = paths.join(workdir, "warm_start")
        if not paths.isfile(paths.join(warm_workdir, "eval_done")):
            log.info("warm start: %d supervised steps in the answer format", config.warm_start.steps)
            _run(experiment.warm_start_config(config), warm_workdir, paths.join(workdir, "eval_init"), None)
            if jax.process_index() == 0:
                paths.write_text(paths.join(warm_workdir, "eval_done"), "")
        config = experiment.after_warm_start(config, warm_workdir)
    return _run(config, workdir, paths.join(workdir, "eval"), stop_after)


def _run(config, workdir: str, eval_dir: str, stop_after: int | None) -> dict:
    primary = jax.process_index() == 0  # the one process that writes the workdir's files
    paths.makedirs(workdir)
    # Before anything is built from the config (a tiny model already in the workdir would be reused).
    workdir_lib.check_resume_config(config, workdir)

    # --- Mesh ------------------------------------------------------------------------------------
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)

    # --- Data --------------------------------------------------------------------------------------
    train_samples, eval_samples = experiment.first_process_first(lambda: experiment.load_samples(config, workdir))
    checkpoint_dir = experiment.first_process_first(
        lambda: experiment.resolve_checkpoint(config, workdir, train_samples)
    )
    transform = experiment.train_transform(config, checkpoint_dir, train_samples)
    global_batch = config.train.batch_size
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % data_parallel or global_batch % jax.process_count():
        raise ValueError(
            f"train.batch_size {global_batch} must be divisible by the data-parallel size {data_parallel} "
            f"(mesh {dict(mesh.shape)}) and by the {jax.process_count()} processes"
        )
    pipeline = settings.pipeline_config(config, train=True, batch_size=global_batch // jax.process_count())
    batches = iter(data_lib.make_pipeline(train_samples, pipeline, transform))

    # --- Model, optimizer --------------------------------------------------------------------------
    with jax.set_mesh(mesh):
        model, tokenizer = experiment.build_model(config, checkpoint_dir, mesh=mesh)
        trainer = experiment.build_trainer(config, model, tokenizer, checkpoint_dir, train_samples, mesh=mesh)
    del model

    # --- Checkpoint: resume from the latest if there is one ---------------------------------------
    checkpointer = Checkpointer(
        workdir_lib.checkpoints(workdir),
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    checkpointer.install_sigterm_handler(grace_s=config.train.sigterm_grace_s)
    state = TrainState(params=trainer.trainable, opt_state=trainer.opt_state, step=0, rng=jax.random.key(config.seed))
    start = 0
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state, batches)
        trainer.trainable, trainer.opt_state = state.params, state.opt_state
        start = int(state.step)
        log.info("resumed from step %d", start)

    # --- Loop --------------------------------------------------------------------------------------
    writer, metrics_log = None, None
    if primary:
        # The run has started: its config is the workdir's now.
        workdir_lib.write_config(config, workdir)
        metrics_log = workdir_lib.MetricsLog(paths.join(workdir, "train_metrics.jsonl"), start)
        writer = workdir_lib.TensorBoard(workdir)
    bar = tqdm.tqdm(total=config.train.steps, initial=start, desc="train", unit="step", disable=not primary)
    step, tick = start, time.perf_counter()
    # The step's dropout key: the run's key and the step, so a resumed run draws the same; derived on the host's CPU
    # backend, so the derivation never waits for the accelerator.
    run_key = trainer_lib.host_key(state.rng)
    # Metrics are logged one step behind (as MaxText does): step k's are fetched once step k+1 is dispatched, so the
    # host never makes the device wait for a loss. A checkpoint is saved only once its step's metrics are checked
    # (the save waits for the step's arrays anyway), so no checkpoint holds a step with a non-finite loss.
    pending = None

    def report(done: _Done) -> None:
        metrics = done.metrics.get() | done.data_counts
        # A step without a loss was skipped (nothing in its batch could be used); the objective logged why.
        if "loss" in metrics and not np.isfinite(metrics["loss"]):
            # Nothing is saved: the last checkpoint is the last good state.
            raise FloatingPointError(
                f"step {done.step}: loss is {metrics['loss']} on samples {done.ids}; stopping (found while step "
                f"{step} ran; no checkpoint after step {done.step - 1} is written)"
            )
        bar.update(done.step - bar.n)
        # Whatever the objective reports as a loss (SFT: loss, lm_loss, st_loss, ...).
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in _SHOWN or k.endswith("_loss")})
        s = done.step
        if s % config.train.log_every == 0 or s == config.train.steps or s == start + 1:
            seconds = time.perf_counter() - tick
            metrics |= {"step": s, "steps_per_s": (s - start) / max(seconds, 1e-9)}
            log.info("step %d: %s", s, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
            if primary:
                metrics_log.append(metrics)
                for k, v in metrics.items():
                    writer.add_scalar(_tensorboard_name(f"train/{k}"), v, s)

    try:
        while step < config.train.steps:
            batch, data_counts = _next_batch(batches)
            key = jax.random.fold_in(run_key, step)
            with jax.set_mesh(mesh):
                # Samples the objective cannot use (GRPO's prompts) are counted with the pipeline's failures.
                dispatched = trainer.dispatch(batch, rng=key, step=step, skip=batches.skip)
            step += 1
            ids = [str(i) for i, v in zip(batch["id"], batch["valid"]) if v]
            if pending is not None:
                report(pending)  # the previous step's, while this one runs
            pending = _Done(step, dispatched, data_counts, ids)
            preempted = checkpointer.reached_preemption(step)
            stop = preempted or (stop_after is not None and step >= stop_after)
            if preempted or step == config.train.steps or checkpointer.save_due(step) or stop:
                report(pending)
                pending = None
            state = TrainState(params=trainer.trainable, opt_state=trainer.opt_state, step=step, rng=state.rng)
            if checkpointer.maybe_save(step, state, batches, force=preempted or step == config.train.steps) and primary:
                metrics_log.flush()  # the rows up to a checkpoint are never lost
                writer.flush()
            if preempted:
                log.warning("SIGTERM: saved step %d, exiting", step)
            if stop:
                break
    finally:
        # A save in flight completes (it holds a good state) before the run ends, error or not.
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        if metrics_log is not None:
            metrics_log.close()
    if step < config.train.steps or stop_after is not None:
        if writer:
            writer.close()
        return {}

    # --- Export, evaluation ------------------------------------------------------------------------
    model, local = trainer.model(), jax.process_count() > 1
    if local:
        # Export and evaluation run on whole copies of the model, one per process (a collective).
        graphdef, params = nnx.split(model)
        model = nnx.merge(graphdef, parallel.process_local(params))
    if config.train.export and primary:
        experiment.export_hf(model, tokenizer, paths.join(workdir, "export"), checkpoint_dir)
    # (jax.set_mesh is only called in the `with`: called alone it would set the mesh globally.)
    stopped = (
        f"SIGTERM during evaluation: training is complete and checkpointed at step {step}; exiting without "
        f"evaluation results (python -m jaxgrounding.evaluate on {workdir} writes them)"
    )
    with checkpoint_lib.exit_on_sigterm(stopped), contextlib.nullcontext() if local else jax.set_mesh(mesh):
        result = evaluation.evaluate(model, tokenizer, eval_samples, checkpoint_dir, config, eval_dir)
    if writer:
        for k, v in result.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(_tensorboard_name(f"eval/{k}"), v, step)
        writer.close()
    log.info("eval: %s", json.dumps(result))
    print(json.dumps({"eval": result}), flush=True)
    return result


@dataclasses.dataclass
class _Done:
    """A dispatched step whose metrics are not yet read: its number, metrics, data counts and sample ids."""

    step: int
    metrics: trainer_lib.PendingMetrics
    data_counts: dict
    ids: list[str]


def _next_batch(batches) -> tuple[dict, dict]:
    """(the next batch, the samples read and skipped so far over all processes), or every process stops.

    The failure cap is judged per process (on its rows of the stream); when one process's data fails
    the others learn it here, before the step's collectives, and all stop with its reasons instead of
    waiting for it forever.
    """
    try:
        batch, failure = next(batches), None
    except data_lib.DataFailureError as e:
        if jax.process_count() == 1:
            raise
        batch, failure = None, e
    messages, (read, failed) = parallel.process_messages(str(failure or ""), (batches.read, batches.failed))
    stopped = [f"process {i}: {m}" for i, m in enumerate(messages) if m]
    if stopped:
        raise data_lib.DataFailureError("data failure, every process stops:\n" + "\n".join(stopped)) from failure
    return batch, {"data_read": int(read), "data_skipped": int(failed)}


def main(argv):
    del argv
    parallel.initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
