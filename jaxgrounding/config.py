"""Helpers shared by the config files in configs/: ':key=value' presets and frozen views.

A config file defines `get_config(arg: str | None) -> ConfigDict`; `arg` is everything after
the ':' in `--config configs/meco.py:model=qwen2_5_vl_3b,data=charades_sta`. Presets are named
dicts of overrides, applied in the order given; any leaf can then be overridden on the command
line with `--config.a.b=value` (ml_collections does that).
"""

from __future__ import annotations

from typing import Mapping

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str]:
    """'model=qwen2_5_vl_3b,data=charades_sta' -> {'model': 'qwen2_5_vl_3b', 'data': 'charades_sta'}."""
    if not arg:
        return {}
    out = {}
    for part in arg.split(","):
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value (in {arg!r})")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def apply_presets(
    config: ml_collections.ConfigDict, arg: str | None, presets: Mapping[str, Mapping[str, Mapping[str, object]]]
) -> ml_collections.ConfigDict:
    """Applies `presets[group][name]` (dotted keys -> values) for every `group=name` in `arg`."""
    for group, name in parse_arg(arg).items():
        if group not in presets:
            raise ValueError(f"unknown preset group {group!r}; known: {sorted(presets)}")
        if name not in presets[group]:
            raise ValueError(f"unknown {group} preset {name!r}; known: {sorted(presets[group])}")
        for dotted, value in presets[group][name].items():
            set_dotted(config, dotted, value)
    return config


def set_dotted(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
