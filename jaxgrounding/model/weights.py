"""HF safetensors <-> VideoLLM parameters, through one declarative table.

`WEIGHT_TABLE` maps each of our parameter paths (regex over the dotted nnx path) to the HF
tensor name in the layout transformers writes and every hub checkpoint uses (`model.layers.N...`,
`visual.blocks.N...`, `lm_head.weight`); transformers 5's nested names
(`model.language_model.`, `model.visual.`) are accepted on load. `{i}` marks a parameter of a
layer stack: our array has a leading layer axis, HF one tensor per layer.

Transforms: `Transposed(k)` for a kernel whose first k axes are inputs (HF stores
[out, in...]); `PatchConv` for the patch embedding (a torch Conv3d [out, C, T, P, P]);
`Reshaped` for biases and norms (flat in HF); `Same` for the embedding table. Each transform goes both ways, so loading and `save_pretrained` share the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model import safetensors_io
from jaxgrounding.model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model config; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class Transposed:
    in_axes: int = 1  # how many leading axes of our kernel are input axes

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return hf.reshape(hf.shape[0], -1).T.reshape(shape)

    def hf_shape(self, ours: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
        return (math.prod(ours[self.in_axes :]), math.prod(ours[: self.in_axes]))

    def to_hf(self, ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
        return ours.reshape(-1, hf_shape[0]).T.reshape(hf_shape)


@dataclasses.dataclass(frozen=True)
class PatchConv(Transposed):
    """The patch embedding: torch Conv3d weight [D, C, Tp, P, P] <-> our kernel [C*Tp*P*P, D]."""

    def hf_shape(self, ours, config):
        v = config.vision
        return (ours[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


@dataclasses.dataclass(frozen=True)
class Reshaped:
    """HF keeps the tensor flat (biases, norm weights); ours may split it, e.g. [heads, head_dim]."""

    def to_ours(self, hf, shape):
        return hf.reshape(shape)

    def hf_shape(self, ours, config):
        return (math.prod(ours),)

    def to_hf(self, ours, hf_shape):
        return ours.reshape(hf_shape)


@dataclasses.dataclass(frozen=True)
class Same(Reshaped):
    """Same shape on both sides (the embedding table)."""

    def hf_shape(self, ours, config):
        return tuple(ours)


# (our parameter path regex, HF tensor name template, transform). First match wins.
WEIGHT_TABLE: tuple[tuple[str, str, object], ...] = (
    (r"decoder\.embed_tokens", "model.embed_tokens.weight", Same()),
    (r"decoder\.norm\.weight", "model.norm.weight", Reshaped()),
    (r"decoder\.lm_head\.kernel", "lm_head.weight", Transposed()),
    (r"decoder\.layers\.self_attn\.o_proj\.kernel", "model.layers.{i}.self_attn.o_proj.weight", Transposed(2)),
    (r"decoder\.layers\.(.+)\.kernel", r"model.layers.{i}.\1.weight", Transposed()),
    (r"decoder\.layers\.(.+)\.(weight|bias)", r"model.layers.{i}.\1.\2", Reshaped()),
    (r"visual\.patch_embed\.kernel", "visual.patch_embed.proj.weight", PatchConv()),
    (r"visual\.blocks\.attn\.proj\.kernel", "visual.blocks.{i}.attn.proj.weight", Transposed(2)),
    (r"visual\.blocks\.(.+)\.kernel", r"visual.blocks.{i}.\1.weight", Transposed()),
    (r"visual\.blocks\.(.+)\.(weight|bias)", r"visual.blocks.{i}.\1.\2", Reshaped()),
    (r"visual\.merger\.ln_q\.(weight|bias)", r"visual.merger.ln_q.\1", Reshaped()),
    (r"visual\.merger\.fc1\.kernel", "visual.merger.mlp.0.weight", Transposed()),
    (r"visual\.merger\.fc1\.bias", "visual.merger.mlp.0.bias", Reshaped()),
    (r"visual\.merger\.fc2\.kernel", "visual.merger.mlp.2.weight", Transposed()),
    (r"visual\.merger\.fc2\.bias", "visual.merger.mlp.2.bias", Reshaped()),
)

# transformers 5 nests the modules; hub checkpoints do not. Normalise to the flat layout.
_NESTED_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# Non-persistent buffers some exporters still write; they carry no parameters.
_IGNORED = re.compile(r".*(rotary_emb|rotary_pos_emb)\.inv_freq$")


def _hf_name(our_path: str) -> tuple[str, object, bool]:
    for pattern, template, transform in WEIGHT_TABLE:
        match = re.fullmatch(pattern, our_path)
        if match:
            return match.expand(template), transform, "{i}" in template
    raise KeyError(f"parameter {our_path} has no entry in WEIGHT_TABLE")


class _Checkpoint:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{path}: no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are read; pickles never are)"
            )
        self.files: dict[str, safetensors_io.SafetensorsFile] = {}
        self.location: dict[str, str] = {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{path}: shard {name} listed in the index is missing")
            st = safetensors_io.SafetensorsFile(file_path)
            self.files[name] = st
            for key in st.keys():
                self.location[self._normalise(key)] = (name, key)

    @staticmethod
    def _normalise(key: str) -> str:
        for nested, flat in _NESTED_PREFIXES:
            if key.startswith(nested):
                return flat + key[len(nested) :]
        return key

    def read(self, name: str, expected_shape: tuple[int, ...], wanted_for: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} (for parameter {wanted_for}) is missing " "from the checkpoint"
            )
        file, key = self.location[name]
        st = self.files[file]
        if st.shape(key) != tuple(expected_shape):
            raise CheckpointError(
                f"{os.path.join(self.path, file)}: tensor {key!r} has shape {st.shape(key)}, "
                f"the config needs {tuple(expected_shape)} (for parameter {wanted_for})"
            )
        return st.get(key)


def _flat_variables(state) -> list[tuple[str, nnx.Variable]]:
    return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def load_state(path: str, abstract_state, config: ModelConfig, mesh=None):
    """Fills an abstract nnx State (from `nnx.eval_shape`) with the checkpoint's tensors.

    With a mesh, every parameter is placed straight into its NamedSharding from the logical
    rules (each device receives only its shard). Raises CheckpointError on a missing, unexpected
    or wrongly shaped tensor, naming file and tensor.
    """
    ckpt = _Checkpoint(path)
    shardings = parallel.state_shardings(abstract_state, mesh) if mesh is not None else None
    sharding_of = dict(_flat_variables(shardings)) if shardings is not None else {}
    used: set[str] = set()
    flat = nnx.to_flat_state(abstract_state)
    for path_tuple, var in flat:
        our_path = ".".join(str(p) for p in path_tuple)
        template, transform, stacked = _hf_name(our_path)
        shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
        if stacked:
            per_layer = shape[1:]
            hf_shape = transform.hf_shape(per_layer, config)
            names = [template.replace("{i}", str(i)) for i in range(shape[0])]
            parts = [transform.to_ours(ckpt.read(n, hf_shape, our_path), per_layer) for n in names]
            host = np.stack([np.asarray(p, dtype=dtype) for p in parts])
        else:
            names = [template]
            host = np.asarray(
                transform.to_ours(ckpt.read(template, transform.hf_shape(shape, config), our_path), shape), dtype=dtype
            )
        used.update(names)
        if mesh is not None:
            var.set_value(jax.device_put(host, sharding_of[our_path].get_value()))
        else:
            var.set_value(jnp.asarray(host))
    unexpected = sorted(k for k in ckpt.location if k not in used and not _IGNORED.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some exporters write the tied head anyway
    if unexpected:
        shown = ", ".join(f"{k} ({ckpt.location[k][0]})" for k in unexpected[:8])
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensor(s) in the checkpoint have no place in a "
            f"{config.model_type} model with this config: {shown}" + (" ..." if len(unexpected) > 8 else "")
        )
    return nnx.from_flat_state(flat)


def hf_tensors(state, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters as HF-named numpy tensors (gathered to the host)."""
    tensors = {}
    for our_path, var in _flat_variables(state):
        template, transform, stacked = _hf_name(our_path)
        array = np.asarray(jax.device_get(var.get_value()))
        if stacked:
            for i in range(array.shape[0]):
                hf_shape = transform.hf_shape(array.shape[1:], config)
                tensors[template.replace("{i}", str(i))] = transform.to_hf(array[i], hf_shape)
        else:
            tensors[template] = transform.to_hf(array, transform.hf_shape(array.shape, config))
    return tensors


def save_pretrained(model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and model.safetensors (sharded with an index past `max_shard_bytes`)."""
    os.makedirs(path, exist_ok=True)
    config: ModelConfig = model.config
    tensors = hf_tensors(nnx.state(model, nnx.Param), config)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    if len(shards) == 1:
        safetensors_io.write(os.path.join(path, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write(os.path.join(path, file), shard)
            weight_map.update({name: file for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = config.to_hf_dict()
    dtypes = {v.get_value().dtype for _, v in _flat_variables(nnx.state(model, nnx.Param))}
    hf["torch_dtype"] = hf["dtype"] = "bfloat16" if dtypes == {jnp.dtype(jnp.bfloat16)} else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
