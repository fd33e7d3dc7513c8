"""ModelConfig: the architecture of a Qwen2-VL / Qwen2.5-VL checkpoint, read from its HF `config.json`.

Hub checkpoints store the text settings flat at the top level (`hidden_size`, `rope_scaling`, ...);
configs written by transformers 5 nest them under `text_config`. Both are accepted. The original
dict is kept so that `save_pretrained` writes back a config transformers loads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Names of `jax.checkpoint_policies` a user may pick for the decoder's layer scan. "none" keeps
# every activation (fastest, most memory); "full" recomputes everything in the backward pass.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


# `model.attention`: jaxgrounding.model.attention.SETTINGS (kept here so the config reads no kernel module).
ATTENTION_SETTINGS = ("auto", "blocked", "xla", "cudnn", "splash", "splash_interpret")


class ConfigError(ValueError):
    """A config.json that does not describe a model jaxgrounding can build."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # Split of the rotary frequencies (head_dim // 2 in all) between the temporal, height and
    # width position streams of M-RoPE.
    mrope_section: tuple[int, int, int]
    hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    rope_theta: float
    # "rms" + gated MLP for Qwen2.5-VL, "layer" + fc1/fc2 MLP for Qwen2-VL.
    norm: str
    gated_mlp: bool
    # Window attention (Qwen2.5-VL): window side in pixels; None means every block attends to the
    # whole frame (Qwen2-VL).
    window_size: int | None
    fullatt_block_indexes: tuple[int, ...]
    # Qwen2.5-VL scales temporal M-RoPE positions by this many position steps per second of video.
    # None (Qwen2-VL) means one step per temporal grid.
    tokens_per_second: float | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch in the processor layout: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tie_word_embeddings: bool
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat_policy: str = "dots_with_no_batch_dims_saveable"
    # Which implementation runs attention (`model.attention`): "auto" picks by backend when traced.
    attention: str = "auto"
    # The config.json this came from, written back by save_pretrained.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> ModelConfig:
        """Reads `path/config.json` (or `path` itself when it is the json file)."""
        config_path = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No model config at {config_path!r}: expected an HF checkpoint directory.")
        with open(config_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{config_path}: not valid JSON ({e}).") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from e

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; jaxgrounding builds {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        text = _text_config(hf)
        vision = _vision_config(model_type, hf.get("vision_config") or {})
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}."
            )
        text_section = hf.get("text_config") or {}
        tie = bool(hf.get("tie_word_embeddings", False) or text_section.get("tie_word_embeddings", False))
        config = cls(
            model_type=model_type,
            text=text,
            vision=vision,
            image_token_id=int(hf.get("image_token_id", 151655)),
            video_token_id=int(hf.get("video_token_id", 151656)),
            vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
            tie_word_embeddings=tie,
            hf_config=hf,
        )
        config = config.replace(**overrides)
        if config.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy {config.remat_policy!r} is not one of {REMAT_POLICIES}.")
        if config.attention not in ATTENTION_SETTINGS:
            raise ConfigError(f"attention {config.attention!r} is not one of {ATTENTION_SETTINGS}.")
        return config

    def to_hf_dict(self) -> dict:
        """The config.json to write next to exported weights (vocab size kept in sync)."""
        hf = json.loads(json.dumps(self.hf_config))
        if "text_config" in hf and isinstance(hf["text_config"], dict):
            hf["text_config"]["vocab_size"] = self.text.vocab_size
        if "vocab_size" in hf or "text_config" not in hf:
            hf["vocab_size"] = self.text.vocab_size
        hf["tie_word_embeddings"] = self.tie_word_embeddings
        return hf


def _text_config(hf: dict) -> TextConfig:
    # Nested (transformers 5) values win over flat (hub) ones; both may be present.
    merged = {**hf, **(hf.get("text_config") or {})}
    try:
        hidden = int(merged["hidden_size"])
        heads = int(merged["num_attention_heads"])
        rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ConfigError("no mrope_section in rope_parameters / rope_scaling.")
        theta = float(rope.get("rope_theta", merged.get("rope_theta", 1000000.0)))
        head_dim = int(merged.get("head_dim") or hidden // heads)
        text = TextConfig(
            vocab_size=int(merged["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(merged["intermediate_size"]),
            num_layers=int(merged["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(merged.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(merged.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            mrope_section=tuple(int(s) for s in section),
            hidden_act=merged.get("hidden_act", "silu"),
        )
    except KeyError as e:
        raise ConfigError(f"text config lacks {e.args[0]!r}.") from None
    if merged.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (no released Qwen-VL checkpoint uses it).")
    if sum(text.mrope_section) != text.head_dim // 2:
        raise ConfigError(f"mrope_section {text.mrope_section} must sum to head_dim // 2 = {text.head_dim // 2}.")
    if text.num_heads % text.num_kv_heads:
        raise ConfigError(f"num_attention_heads {text.num_heads} is not a multiple of num_key_value_heads.")
    return text


def _vision_config(model_type: str, v: dict) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", 10000.0))
    in_channels = int(v.get("in_channels", v.get("in_chans", 3)))
    patch = int(v.get("patch_size", v.get("spatial_patch_size", 14)))
    try:
        if model_type == "qwen2_5_vl":
            return VisionConfig(
                depth=int(v["depth"]),
                hidden_size=int(v["hidden_size"]),
                num_heads=int(v["num_heads"]),
                intermediate_size=int(v["intermediate_size"]),
                out_hidden_size=int(v["out_hidden_size"]),
                patch_size=patch,
                temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                in_channels=in_channels,
                hidden_act=v.get("hidden_act", "silu"),
                rope_theta=theta,
                norm="rms",
                gated_mlp=True,
                window_size=int(v.get("window_size", 112)),
                fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                tokens_per_second=float(v.get("tokens_per_second", 2)),
            )
        embed = int(v["embed_dim"])
        return VisionConfig(
            depth=int(v["depth"]),
            hidden_size=embed,
            num_heads=int(v["num_heads"]),
            intermediate_size=int(embed * float(v.get("mlp_ratio", 4))),
            out_hidden_size=int(v["hidden_size"]),
            patch_size=patch,
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            in_channels=in_channels,
            hidden_act=v.get("hidden_act", "quick_gelu"),
            rope_theta=theta,
            norm="layer",
            gated_mlp=False,
            window_size=None,
            fullatt_block_indexes=tuple(range(int(v["depth"]))),
            tokens_per_second=None,
        )
    except KeyError as e:
        raise ConfigError(f"vision_config lacks {e.args[0]!r}.") from None
