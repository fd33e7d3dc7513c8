"""A checkpoint named by a local directory or a hub id ("Qwen/Qwen2.5-VL-7B-Instruct") -> a local directory.

Hub ids go through `huggingface_hub.snapshot_download`, so its cache (HF_HOME / HF_HUB_CACHE) and offline
mode (HF_HUB_OFFLINE=1: the cache only, no network) apply as in transformers. With the cache on a shared
filesystem, a multi-host run downloads once: the caller resolves on process 0 first
(`experiment.first_process_first`), the other hosts then find the snapshot in the cache.
"""

from __future__ import annotations

import os

# What from_pretrained, the tokenizer and the processor read; not the repository's other weights formats.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model")


def resolve(name: str) -> str:
    """The local directory of checkpoint `name`: `name` itself if it is a directory, else the hub snapshot
    (downloaded into the hub cache unless it is there already)."""
    if os.path.isdir(name):
        return name
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"model.checkpoint={name!r}: no such directory (and not a hub id)") from None
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=list(CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        offline = constants.HF_HUB_OFFLINE
        raise FileNotFoundError(
            f"model.checkpoint={name!r}: not a local directory, and the hub id is not in the hub cache "
            f"({constants.HF_HUB_CACHE})"
            + (" while HF_HUB_OFFLINE is set" if offline else " nor reachable")
            + f". Download it once (`hf download {name}`) or pass its directory."
        ) from e
