"""Named model shapes: the tiny default and the released Qwen2.5-VL checkpoints, as HF `config.json` dicts.

Tests, benches and the default configs build models from these names instead of writing shapes of
their own. A real run still reads the shape from its checkpoint directory (`ModelConfig.from_pretrained`);
the 3B / 7B entries reproduce those checkpoints' `config.json` (architecture fields only), so a bench can
compile the real shapes with abstract parameters (`nnx.eval_shape`) and nothing to download.

    config = presets.model_config("qwen2_5_vl_7b", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    hf = presets.tiny(hidden=64, layers=2)      # a smaller tiny model for a test
"""

from __future__ import annotations

import copy

from jaxgrounding.model.config import ModelConfig

# The tiny default model's sizes (configs/meco.py's `model.tiny`, the tiny checkpoint the default runs
# build, the benches' default shape): text width (head_dim 32), decoder layers, vision blocks and width.
TINY_SIZES = {"hidden": 128, "layers": 4, "vision_depth": 2, "vision_hidden": 64}

# Token ids of a tiny model built without a tokenizer (any distinct ids below the vocabulary); the tiny
# checkpoint directory (`model.tiny`) uses its trained tokenizer's ids instead.
TINY_VOCAB = 1024
TINY_TOKEN_IDS = {
    "<|endoftext|>": 1004,
    "<|im_end|>": 1005,
    "<|vision_start|>": 1002,
    "<|vision_end|>": 1003,
    "<|image_pad|>": 1000,
    "<|video_pad|>": 1001,
}


def tiny(
    token_ids: dict[str, int] | None = None,
    vocab_size: int = TINY_VOCAB,
    *,
    hidden: int = TINY_SIZES["hidden"],
    layers: int = TINY_SIZES["layers"],
    vision_depth: int = TINY_SIZES["vision_depth"],
    vision_hidden: int = TINY_SIZES["vision_hidden"],
) -> dict:
    """config.json of a small Qwen2.5-VL (head_dim 32, MLP 3x, half as many KV heads as heads); the vision
    window covers a whole 56 px frame."""
    ids = TINY_TOKEN_IDS if token_ids is None else token_ids
    head_dim = 32
    heads = hidden // head_dim
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": max(1, vision_hidden // 32),
            "out_hidden_size": hidden,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
            "tokens_per_second": 2,
            "in_channels": 3,
            "hidden_act": "silu",
        },
    }


def _qwen2_5_vl(*, hidden, intermediate, layers, heads, kv_heads, vocab, tie) -> dict:
    """The hub layout of a Qwen2.5-VL-*-Instruct config.json: text settings flat at the top level, the
    vision tower (the same 32-block, 1280-wide tower at every size) under `vision_config`."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "max_position_embeddings": 128000,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": tie,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    }


def qwen2_5_vl_3b() -> dict:
    """Qwen2.5-VL-3B-Instruct: 36 layers of width 2048, 16 heads / 2 KV heads, tied embeddings."""
    return _qwen2_5_vl(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tie=True)


def qwen2_5_vl_7b() -> dict:
    """Qwen2.5-VL-7B-Instruct: 28 layers of width 3584, 28 heads / 4 KV heads, untied embeddings."""
    return _qwen2_5_vl(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tie=False)


# The names the configs' `model=` presets use (configs/*.py) and the benches' --shape / --model.
PRESETS = {"tiny": tiny, "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b}


def hf_config(name: str) -> dict:
    """A fresh copy of preset `name`'s config.json dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())


def model_config(name: str, **overrides) -> ModelConfig:
    """`ModelConfig` of preset `name`; `overrides`: ModelConfig fields (param_dtype, compute_dtype, remat_policy)."""
    return ModelConfig.from_hf_dict(hf_config(name), **overrides)
