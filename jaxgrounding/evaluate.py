"""Evaluate the latest checkpoint of a workdir on the config's held-out split.

    python -m jaxgrounding.evaluate --config configs/meco.py --workdir runs/meco

Writes workdir/eval/metrics.json ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", percent) and
workdir/eval/predictions.jsonl (one line per sample, windows ranked best first).
"""

from __future__ import annotations

import json
import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxgrounding import evaluation, parallel, paths
from jaxgrounding.training import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:presets]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by jaxgrounding.train.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    parallel.initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, workdir = _CONFIG.value, _WORKDIR.value
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _, eval_samples = experiment.load_samples(config, workdir)
    with jax.set_mesh(mesh):
        model, tokenizer, checkpoint_dir, step = experiment.restore_model(config, workdir)
        result = evaluation.evaluate(
            model, tokenizer, eval_samples, checkpoint_dir, config, paths.join(workdir, "eval")
        )
    print(json.dumps({"step": step, "eval": result}), flush=True)


if __name__ == "__main__":
    app.run(main)
