"""GRPO on MeCo's structural answers (answer.format = "structural"): rollouts read as `inference.predict` reads
an answer, the whole-video fallback earns no IoU, and the train command's MeCo warm start carries its heads and
<ent>/<tst> rows into GRPO. (Apart from tests/training/test_grpo.py so that the two long micro runs go to
different test workers.)"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import invert4tvg
from jaxgrounding import data as data_lib
from jaxgrounding import settings
from jaxgrounding.data import padding
from jaxgrounding.grounding_model import batch_inputs, batch_plan, device_batch
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig
from jaxgrounding.train import train_and_evaluate
from jaxgrounding.training import experiment, grpo
from tests.training.test_grpo import _jsonl, micro_config


def structural_config(data_root):
    config = micro_config(data_root)
    config.answer.format = "structural"
    config.grpo.rewards = ()  # the format's own
    config.grpo.grounding_prob = 1.0
    config.warm_start.steps = 2
    config.train.steps = 1
    config.train.checkpoint_every = 1
    return config


def test_sample_predictions_read_each_sample_as_predict_does(tmp_path, monkeypatch):
    """G greedy samples of a prompt are G copies of `inference.predict`'s answer: the same structural tokens, the
    same similarities to the prompt's frames, the same windows. An untrained model writes no structural token, so
    both generations get <ent> / <tst> written over tokens 1 and 3 (the states that predicted them are kept)."""
    import dataclasses

    from jaxgrounding import inference, sampling
    from jaxgrounding.tasks import templates

    config = structural_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    model, tokenizer = experiment.build_model(config, checkpoint)
    generate = sampling.generate

    def with_structural_tokens(*args, **kwargs):
        gen = generate(*args, **kwargs)
        tokens = np.asarray(gen.tokens).copy()
        tokens[:, 1], tokens[:, 3] = tokenizer.ent_id, tokenizer.tst_id
        return dataclasses.replace(gen, tokens=jnp.asarray(tokens), lengths=jnp.full_like(gen.lengths, 4))

    monkeypatch.setattr(sampling, "generate", with_structural_tokens)
    encoder = ChatEncoder(checkpoint, EncoderConfig.from_config(config, train=False), video_first=True)
    videos = [data_lib.read_video(s.video, fps=1.0, max_frames=12, size=(56, 56)) for s in train[:2]]
    prompts = [
        encoder.prompt(templates.instruction("grounding", s.query, None), v) | {"duration": np.float32(s.duration)}
        for s, v in zip(train, videos)
    ]
    arrays = padding.pad_and_stack(prompts, 2, settings.prompt_buckets(config))
    greedy = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0, top_p=1.0)
    assignment = inference.AssignmentConfig.from_config(config)
    want = inference.predict(model, arrays, tokenizer, (56, 56), greedy, assignment)
    device = device_batch(arrays)
    inputs = batch_inputs(device, model.llm.config, batch_plan(device, model.llm.config, (56, 56)))
    gen = with_structural_tokens(
        model.llm, inputs, greedy, end_ids=[tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")], num_samples=2,
        hidden_layers=(-2,), prompt_layers=(-1,),
    )
    got = inference.sample_predictions(model, arrays, tokenizer, assignment, gen, 2)
    assert len(got) == 4
    for r, prediction in enumerate(got):
        expected = want[r // 2]
        assert prediction.kinds == expected.kinds == ["ent", "tst"] and prediction.windows
        np.testing.assert_allclose(prediction.similarity, expected.similarity, atol=1e-5)
        assert [(w.start, w.end) for w in prediction.windows] == [(w.start, w.end) for w in expected.windows]


def test_the_whole_video_fallback_earns_no_structural_iou():
    from jaxgrounding.inference import Prediction
    from jaxgrounding.tasks import rewards
    from jaxgrounding.tasks.structural import GroundedWindow

    def prediction(*windows):
        return Prediction("", list(windows), np.zeros((0, 3)), [], np.zeros(3), 1.0)

    fallback = GroundedWindow(0.0, 30.0, 0.0, -1)
    chosen = GroundedWindow(2.0, 6.0, 0.4, 0)
    windows = grpo.chosen_windows([prediction(fallback), prediction(chosen, fallback), None])
    assert windows == [[], [(2.0, 6.0)], None]
    sample = data_lib.Sample(id="v/0", video="v.mp4", duration=30.0, query="q", windows=((2.0, 6.0),))
    got = [rewards.task_rewards("", sample, "grounding", names=("structural_iou",), windows=w) for w in windows[:2]]
    assert got == [{"structural_iou": 0.0}, {"structural_iou": 1.0}]


def test_structural_warm_start_then_grpo(tmp_path):
    """answer.format = "structural": MeCo's SFT (LM + L_ST) as the warm start, its exported heads carried into
    GRPO, rewards from the top window of the structural answer, MeCo's evaluation before and after."""
    from jaxgrounding.model.tokenizer import load_tokenizer
    from jaxgrounding.model.weights import read_safetensors

    config = structural_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir)
    init = json.load(open(os.path.join(workdir, "eval_init", "metrics.json")))
    for metrics in (init, result):
        assert {"R1@0.5", "mIoU"} <= set(metrics) and "parse_failures" not in metrics
    logged = _jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    assert [m["step"] for m in logged] == [1]
    for m in logged:
        assert {"reward_structural_iou", "reward_structural_format", "kl"} <= set(m) and np.isfinite(m["loss"])
        assert "reward_iou" not in m
    warm = [json.loads(line) for line in open(os.path.join(workdir, "warm_start", "train_metrics.jsonl"))]
    assert all("st_loss" in m for m in warm)  # the warm start trained L_ST

    # GRPO started from the warm start's heads, read back from its export.
    export = os.path.join(workdir, "warm_start", "export")
    model, _ = experiment.build_model(experiment.after_warm_start(config, os.path.join(workdir, "warm_start")), export)
    # ... and with the <ent>/<tst> embedding rows the warm start trained (not re-initialised to the mean).
    weights = read_safetensors(os.path.join(export, "model.safetensors"))
    trained = weights["model.embed_tokens.weight"]
    tokenizer = load_tokenizer(export)
    rows = [tokenizer.ent_id, tokenizer.tst_id]
    np.testing.assert_array_equal(np.asarray(model.llm.decoder.embed_tokens[...])[rows], trained[rows])
    assert not np.allclose(trained[rows[0]], trained[: tokenizer.base_vocab_size].mean(0))
    stored = read_safetensors(os.path.join(export, experiment.HEADS_FILE))
    for key, variable in nnx.to_flat_state(nnx.state(model.heads)):
        want = stored[".".join(map(str, key))]
        np.testing.assert_array_equal(np.asarray(variable.get_value()), want.reshape(variable.get_value().shape))


def test_structural_config_refuses_inversion_tasks():
    from jaxgrounding.train import check_config

    config = invert4tvg.get_config()
    config.answer.format = "structural"
    with pytest.raises(ValueError, match="grounding_prob"):
        check_config(config)
    config.grpo.grounding_prob = 1.0
    check_config(config)
    config.answer.format = "seconds"
    with pytest.raises(ValueError, match="answer.format"):
        check_config(config)
