"""bench/accelerator.py end to end at its --quick shape (one method: each compile of a train step for 8 virtual
devices takes tens of seconds here), and its depth extrapolation."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "accelerator.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accelerator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_the_compiled_memory_of_a_train_step():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--methods", "grpo", "--no-time"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert line["bench"] == "accelerator" and line["method"] == "grpo" and line["model"] == "tiny"
    assert line["devices"] == 8 and line["mesh"] == {"fsdp": 4, "tensor": 2}
    assert (line["param_dtype"], line["compute_dtype"]) == ("float32", "bfloat16")
    assert line["peak_bytes"] == (
        line["argument_bytes"] + line["output_bytes"] + line["temp_bytes"] - line["alias_bytes"]
    )
    # Full fine-tuning: Adam's two moments are sharded like the parameters (twice their bytes per device).
    assert line["opt_state_bytes"] >= 2 * line["params_bytes"] > 0
    assert line["argument_bytes"] >= line["params_bytes"] + line["opt_state_bytes"]
    assert line["reference_bytes"] == line["params_bytes"]  # GRPO's reference copy, outside the step


def test_lora_run_trains_the_adapters_only():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--methods", "grpo", "--no-time", "--lora-rank", "4"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert (line["trainable"], line["lora_rank"]) == ("lora", 4)
    # Adam's moments cover what trains (adapters, new token rows, the tiny tower), not the frozen base weights:
    # under full fine-tuning they are at least twice the parameters (the test above).
    assert 0 < line["opt_state_bytes"] < 2 * line["params_bytes"]
    assert "reference_bytes" not in line  # the reference policy is the base with the adapters off


def test_extrapolation_is_the_line_through_two_depths():
    bench = _bench()
    low = {"layers": 2} | {k: 100 + 10 * 2 for k in bench.FIELDS}
    high = {"layers": 4} | {k: 100 + 10 * 4 for k in bench.FIELDS}
    full = bench.extrapolate(low, high, 36)
    assert all(full[k] == 100 + 10 * 36 and full[f"{k}_per_layer"] == 10 for k in bench.FIELDS)
