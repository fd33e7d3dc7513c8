"""`export_hf`: what training writes to WORKDIR/export is read by transformers (and vLLM through it) as the model we
trained: the processor configs and chat template our pipeline uses, weights with the same logits, and MeCo's
heads read back by `build_model`.

transformers' video processor needs torchvision, which has no CPU build on the package index, so the processor is
checked through the readers AutoProcessor itself calls: the image processor, the video processor config, the
processor's chat template."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from jaxgrounding.model.positions import rope_positions
from jaxgrounding.model.processor import VisualProcessor
from jaxgrounding.model.tiny import build_tiny_checkpoint
from jaxgrounding.training import experiment
from tests.model import hf_reference as ref
from tests.test_train import micro_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base checkpoint, export, model, tokenizer): a tiny grounding model exported with `export_hf`."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = build_tiny_checkpoint(
        str(root / "base"), ["find the door", "a person opens the door"], hidden=32, layers=1, vision_depth=1,
        vision_hidden=16,
    )
    config = micro_config(root / "data")
    model, tokenizer = experiment.build_model(config, checkpoint)
    # Trained heads are not the initial ones: perturbed, so reading them back can tell.
    for _, variable in nnx.to_flat_state(nnx.state(model.heads)):
        variable.set_value(variable.get_value() + 0.5)
    export = str(root / "export")
    experiment.export_hf(model, tokenizer, export, checkpoint)
    return checkpoint, export, model, tokenizer, config


def test_processor_configs_agree_with_our_preprocessing(exported):
    from transformers import AutoImageProcessor, Qwen2_5_VLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    checkpoint, export, _, tokenizer, _ = exported
    ours = VisualProcessor.from_pretrained(checkpoint)
    assert VisualProcessor.from_pretrained(export) == ours
    image = AutoImageProcessor.from_pretrained(export)
    video, _ = BaseVideoProcessor.get_video_processor_dict(export)
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    for settings in (image.to_dict(), video):
        assert (settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]) == (14, 2, 2)
        assert settings["size"] == {"shortest_edge": ours.min_pixels, "longest_edge": ours.max_pixels}
        np.testing.assert_allclose(settings["image_mean"], ours.image_mean)
    processor, _ = Qwen2_5_VLProcessor.get_processor_dict(export)
    assert processor["chat_template"] == tokenizer.tokenizer.chat_template
    assert "<|video_pad|>" in processor["chat_template"]


def test_transformers_model_has_our_logits(exported):
    import torch
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    _, export, model, tokenizer, _ = exported
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    # An image through transformers' own image processor; its placeholder repeated once per merged patch, as the
    # processor does.
    image = np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)
    pixels = AutoImageProcessor.from_pretrained(export)(images=[image], return_tensors="np")
    grid = pixels["image_grid_thw"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "find the door"}]}]
    text = tokenizer.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
    ids = np.asarray([tokenizer.tokenizer(text)["input_ids"]], np.int64)
    image_id = model.llm.config.image_token_id
    assert (ids == image_id).sum() == 4  # a 56x56 image: 4x4 patches, merged 2x2
    batch = dict(
        input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels["pixel_values"], image_grid_thw=grid
    )
    positions, _ = rope_positions(ids, model.llm.config, image_grid_thw=grid)
    mm_types = (ids == image_id).astype(np.int64)
    want, _ = ref.torch_forward(torch_model, {**batch, "mm_token_type_ids": mm_types}, positions)
    np.testing.assert_allclose(np.asarray(model.llm(**batch).logits), want, atol=1e-4)


def test_build_model_reads_the_exported_heads(exported):
    _, export, model, _, config = exported
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2_5_vl"
    again, _ = experiment.build_model(config, export)
    stored = dict(nnx.to_flat_state(nnx.state(model.heads)))
    for key, variable in nnx.to_flat_state(nnx.state(again.heads)):
        np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(stored[key].get_value()))


def test_an_export_in_the_old_layout_is_refused(exported, tmp_path):
    """Its heads beside the weights, where exports kept them before: read as a base checkpoint it would lose them."""
    import shutil

    _, export, _, _, config = exported
    old = shutil.copytree(export, tmp_path / "old")
    os.replace(old / experiment.HEADS_FILE, old / "structural_heads.safetensors")
    with pytest.raises(FileNotFoundError, match=r"structural_heads\.safetensors: an export in the old layout"):
        experiment.build_model(config, str(old))
