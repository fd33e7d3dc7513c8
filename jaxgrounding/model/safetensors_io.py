"""Minimal, dependency-free reading and writing of the safetensors format.

Why our own: `safetensors`' numpy backend cannot return bfloat16 (every released Qwen-VL
checkpoint is bf16), and going through torch would make torch a runtime dependency. The format
is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then raw little-endian bytes; reading memory-maps the file so a parameter costs only its bytes.
Nothing here executes code from the file.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file."""


class SafetensorsFile:
    """Lazy read access to one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{path}: truncated (no header)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > size - 8:
                    raise SafetensorsError(f"{path}: header length {header_len} exceeds file size {size}")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: not a safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._size = size
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or self._data_start + end > self._size:
            raise SafetensorsError(f"{self.path}: tensor {name} is truncated or its offsets are corrupt")
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(dtype.newbyteorder("<")).reshape(shape)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays, any supported dtype) to `path` atomically."""
    header, offset = {}, 0
    arrays = {}
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
        arrays[name] = array
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays.values():
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
