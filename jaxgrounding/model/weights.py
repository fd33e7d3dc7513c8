"""HF safetensors <-> VideoLLM parameters, through one declarative table.

`WEIGHT_TABLE` maps each of our parameter paths (regex over the dotted nnx path) to the HF
tensor name in the layout transformers writes and every hub checkpoint uses (`model.layers.N...`,
`visual.blocks.N...`, `lm_head.weight`); transformers 5's nested names
(`model.language_model.`, `model.visual.`) are accepted on load. `{i}` marks a parameter of a
layer stack: our array has a leading layer axis, HF one tensor per layer.

Transforms: `Transposed(k)` for a kernel whose first k axes are inputs (HF stores
[out, in...]); `PatchConv` for the patch embedding (a torch Conv3d [out, C, T, P, P]);
`Reshaped` for biases and norms (flat in HF); `Same` for the embedding table. Each transform goes both ways, so loading and `save_pretrained` share the table.

Files are read and written by the `safetensors` library (never pickles). Reads are lazy: a parameter is read
block by block as its sharding asks (`jax.make_array_from_callback`), and a block reads only the rows and
columns it covers where the layout allows (`get_slice`), so each host reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy backend looks up by name)
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model config; the message names the file and tensor."""


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt); the message names it."""


def open_safetensors(path: str):
    """A lazy reader of one .safetensors file (`keys`, `get_tensor`, `get_slice`); reads nothing but the header."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except (OSError, safetensors.SafetensorError) as e:
        raise SafetensorsError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a (small) .safetensors file."""
    file = open_safetensors(path)
    try:
        return {name: file.get_tensor(name) for name in file.keys()}
    except safetensors.SafetensorError as e:
        raise SafetensorsError(f"{path}: corrupt tensor data ({e})") from e


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` atomically (a reader never sees half a file), with the `{"format": "pt"}` metadata
    transformers requires of a checkpoint."""
    tmp = path + ".tmp"
    safetensors.numpy.save_file(
        {name: np.ascontiguousarray(array) for name, array in tensors.items()}, tmp, metadata={"format": "pt"}
    )
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Transposed:
    in_axes: int = 1  # how many leading axes of our kernel are input axes

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return hf.reshape(hf.shape[0], -1).T.reshape(shape)

    def hf_shape(self, ours: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
        return (math.prod(ours[self.in_axes :]), math.prod(ours[: self.in_axes]))

    def to_hf(self, ours: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
        return ours.reshape(-1, hf_shape[0]).T.reshape(hf_shape)

    def read(self, view, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        """Block `index` of our kernel from the HF tensor `view`: HF rows are our output axes, its columns our
        input axes, so a block that is one range of each reads just that sub-matrix."""
        rows = _flat_range(index[self.in_axes :], shape[self.in_axes :])
        cols = _flat_range(index[: self.in_axes], shape[: self.in_axes])
        if rows is None or cols is None:
            return self.to_ours(view[:], shape)[index]
        # The patch embedding's HF tensor is 5-D: its rows are read whole, then cut to the columns.
        hf = view[rows, cols] if len(view.get_shape()) == 2 else view[rows].reshape(rows.stop - rows.start, -1)[:, cols]
        return hf.T.reshape(_block_shape(index, shape))


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

    def read(self, view, index, shape):
        flat = _flat_range(index, shape)
        if flat is None:
            return self.to_ours(view[:], shape)[index]
        return view[flat].reshape(_block_shape(index, shape))


@dataclasses.dataclass(frozen=True)
class Same(Reshaped):
    """Same shape on both sides (the embedding table)."""

    def hf_shape(self, ours, config):
        return tuple(ours)

    def read(self, view, index, shape):
        return view[index]


def _block_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def _flat_range(index: tuple[slice, ...], shape: tuple[int, ...]) -> slice | None:
    """The row-major flat positions that block `index` (unit-stride slices) of an array of `shape` covers, as one
    range; None when they are not one range (an axis before the last cut one spans more than one position)."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    lengths = [stop - start for start, stop in bounds]
    cut = [k for k, n in enumerate(shape) if lengths[k] != n]
    if cut and any(length != 1 for length in lengths[: cut[-1]]):
        return None
    start = int(np.ravel_multi_index([b[0] for b in bounds], shape)) if shape else 0
    return slice(start, start + math.prod(lengths))


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
        self.files = {}
        self.location: dict[str, tuple[str, str]] = {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise FileNotFoundError(f"{path}: shard {name} listed in the index is missing")
            st = open_safetensors(file_path)
            self.files[name] = st
            for key in st.keys():
                self.location[self._normalise(key)] = (name, key)

    @staticmethod
    def _normalise(key: str) -> str:
        for nested, flat in _NESTED_PREFIXES:
            if key.startswith(nested):
                return flat + key[len(nested) :]
        return key

    def view(self, name: str, expected_shape: tuple[int, ...], wanted_for: str):
        """A lazy view of tensor `name` (nothing read yet), once it is known to be there with the expected shape."""
        if name not in self.location:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} (for parameter {wanted_for}) is missing from the checkpoint"
            )
        file, key = self.location[name]
        view = self.files[file].get_slice(key)
        shape = tuple(view.get_shape())
        if shape != tuple(expected_shape):
            raise CheckpointError(
                f"{os.path.join(self.path, file)}: tensor {key!r} has shape {shape}, "
                f"the config needs {tuple(expected_shape)} (for parameter {wanted_for})"
            )
        return view


def _flat_variables(state) -> list[tuple[str, nnx.Variable]]:
    return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def _block_reader(views, transform, stacked: bool, shape: tuple[int, ...], dtype):
    """index -> that block of our parameter, from the HF tensors `views` (one per layer where `stacked`, each of
    our per-layer `shape`); a stacked block reads only the layers it covers."""
    # Devices that replicate a block (over the data axis) ask for it each: it is read once.
    blocks: dict[tuple, np.ndarray] = {}

    def read_once(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)  # slices are unhashable before Python 3.12
        if key not in blocks:
            blocks[key] = read(index)
        return blocks[key]

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(transform.read(views[0], index, shape), dtype)
        layers = range(*index[0].indices(len(views)))
        return np.stack([np.asarray(transform.read(views[i], index[1:], shape), dtype) for i in layers])

    return read_once


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
        names = [template.replace("{i}", str(i)) for i in range(shape[0])] if stacked else [template]
        per_tensor = shape[1:] if stacked else shape
        hf_shape = transform.hf_shape(per_tensor, config)
        read = _block_reader([ckpt.view(n, hf_shape, our_path) for n in names], transform, stacked, per_tensor, dtype)
        used.update(names)
        if mesh is not None:  # each device's block is read on its own host
            var.set_value(jax.make_array_from_callback(shape, sharding_of[our_path].get_value(), read))
        else:
            var.set_value(jnp.asarray(read(tuple(slice(None) for _ in shape))))
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
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, file), shard)
            weight_map.update({name: file for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = config.to_hf_dict()
    dtypes = {v.get_value().dtype for _, v in _flat_variables(nnx.state(model, nnx.Param))}
    hf["torch_dtype"] = hf["dtype"] = "bfloat16" if dtypes == {jnp.dtype(jnp.bfloat16)} else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
