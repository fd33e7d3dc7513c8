"""What a config means for a run: the samples, the base checkpoint, the model to train, its
restored and exported forms.

Shared by the train / evaluate / ground commands so that each stays a short, linear main().
Settings objects come from `jaxgrounding.settings`; evaluation is `jaxgrounding.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding import data as data_lib
from jaxgrounding import paths, settings
from jaxgrounding.data.synthetic_scenes import SceneConfig
from jaxgrounding.grounding_model import GroundingModel
from jaxgrounding.memory.layout import StreamingConfig
from jaxgrounding.model import hub
from jaxgrounding.model.lora import apply_lora
from jaxgrounding.model.tiny import build_tiny_checkpoint
from jaxgrounding.model.tokenizer import init_token_rows, load_tokenizer
from jaxgrounding.tasks import encoding, inversion, templates, timestamps
from jaxgrounding.tasks.coarse_to_fine import CoarseToFineConfig
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig, StructuralEncoder
from jaxgrounding.tasks.streamed import StreamedEncoder
from jaxgrounding.training.checkpoint import Checkpointer, TrainState
from jaxgrounding.training import grpo, sft  # noqa: F401  (register the methods' objectives)
from jaxgrounding.training import workdir as workdir_lib
from jaxgrounding.training.trainer import Trainer, TrainerConfig, make_objective

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def first_process_first(fn):
    """Runs `fn` on process 0, then on the others: work that writes shared files (generating
    the synthetic set, building the tiny checkpoint) happens once; the rest read the result."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxgrounding: shared files ready")
    return fn() if jax.process_index() != 0 else out


def synthetic_root(config, workdir: str, synthetic: data_lib.SyntheticConfig) -> str:
    """`data.root`, or by default workdir/../data/<name>-<hash of the set's config>: runs of different sets
    (scene families, sizes, seeds) sharing a parent never regenerate each other's videos under a live run. The
    decoders read local files: for a remote workdir the default is in the local cache (`paths.cache_root()`)."""
    if config.data.root:
        return config.data.root
    name = config.data.synthetic_name
    digest = hashlib.sha256(json.dumps(synthetic.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    parent = os.path.dirname(os.path.abspath(workdir)) if paths.is_local(workdir) else paths.cache_root()
    return os.path.join(parent, "data", f"{name}-{digest}")


def load_samples(config, workdir: str) -> tuple[list, list]:
    """(train samples, eval samples) for `config.data`."""
    if config.data.name == "synthetic":
        synthetic = data_lib.SyntheticConfig(
            splits=(("train", config.data.synthetic_train_videos), ("val", config.data.synthetic_eval_videos)),
            scene=SceneConfig(**dict(config.data.scene)),
        )
        splits = data_lib.ensure_synthetic_dataset(synthetic_root(config, workdir, synthetic), synthetic)
        return splits["train"], splits["val"]
    root = config.data.root
    if not root:
        raise ValueError(f"data.name={config.data.name!r} needs --config.data.root=<dataset directory>")

    def load(name, durations):
        path = os.path.join(root, name)
        kwargs = {"durations": os.path.join(root, durations)} if durations else {}
        loaded = data_lib.load_annotations(
            path,
            config.data.name,
            video_root=os.path.join(root, config.data.video_root),
            on_bad_line=config.data.on_bad_line,
            allow_outside_video_root=config.data.allow_outside_video_root,
            **kwargs,
        )
        log.info("%s: %d samples (%s)", path, len(loaded.samples), loaded.report)
        if not loaded.samples:
            raise ValueError(f"{path}: no usable sample ({loaded.report})")
        return loaded.samples

    return (
        load(config.data.train_annotations, config.data.train_durations),
        load(config.data.eval_annotations, config.data.eval_durations),
    )


def text_corpus(samples, *, frame_time_text: bool) -> list[str]:
    """Texts the tiny tokenizer is trained on: queries, captions, the instruction templates and the text
    answer format (grounding prompts, inversion prompts, `<answer>` windows), so both answer formats
    tokenise into few pieces; with `frame_time_text`, the time texts written before each frame."""
    texts = [s.query for s in samples] + [c for s in samples for c in (s.captions or [])]
    texts += [p for task in templates.TASKS for p in templates.TEMPLATES[task]]
    texts += [
        timestamps.grounding_prompt("the event", thinking=thinking, phrasing=p)
        for p in range(len(timestamps.PHRASINGS))
        for thinking in (False, True)
    ]
    texts += [inversion.PROMPTS[task].format(masked="a person [] the door") for task in inversion.INVERSION_TASKS]
    rng = np.random.default_rng(0)
    for start in rng.uniform(0, 60, size=200):
        window = (start, start + rng.uniform(0.5, 20))
        texts.append(timestamps.format_answer(window, thinking=None))
        texts.append(timestamps.format_answer(window, thinking=f"The event is seen from {window[0]:.2f} to {window[1]:.2f}."))
    if frame_time_text:
        longest = max((s.duration for s in samples), default=0.0)
        texts += [encoding.frame_time_text(t) for t in np.arange(0.0, longest + 1.0, 0.1)]
    return texts


# The hub ids of the real model presets, named in the error a preset without a checkpoint stops with.
PRESET_HUB_IDS = {"qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct"}


def checkpoint_name(config) -> str:
    """`config.model.checkpoint`. A real model preset without one stops here, before any data or model work:
    the tiny random model it would otherwise build trains without error and means nothing."""
    preset = config.model.preset
    if preset != "tiny" and not config.model.checkpoint:
        example = PRESET_HUB_IDS.get(preset, "<hub id>")
        raise ValueError(
            f"model={preset} sets that model's training recipe, not its weights: give the checkpoint with "
            f"--config.model.checkpoint=<HF checkpoint directory> or a hub id ({example})"
        )
    return config.model.checkpoint


def local_checkpoint(name: str) -> str:
    """The local directory of checkpoint `name`: a directory, a hub id (through the hub cache), or an object-store
    URL (a warm start's export in a gs:// workdir), copied into the local cache once."""
    if paths.is_local(name):
        return hub.resolve(name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return paths.download(name, os.path.join(paths.cache_root(), "checkpoints", digest))


def resolve_checkpoint(config, workdir: str, train_samples) -> str:
    """The HF checkpoint directory (a hub id resolved through the hub cache); builds the tiny default into
    workdir/tiny_model when none is given (a remote workdir: built in the local cache and uploaded there)."""
    if checkpoint_name(config):
        return local_checkpoint(config.model.checkpoint)
    sizes = dict(config.model.tiny)
    local = build_tiny_checkpoint(
        paths.local_cache(workdir, "tiny_model"),
        text_corpus(train_samples, frame_time_text=config.encoder.frame_time_text),
        seed=config.seed,
        **sizes,
    )
    if not paths.is_local(workdir) and jax.process_index() == 0:
        paths.upload(local, paths.join(workdir, "tiny_model"))  # for evaluate / ground on another machine
    return local


def train_transform(config, checkpoint: str, train_samples):
    """The pipeline transform of `config.method`: MeCo's structural examples (cut for streaming, with their
    coarse-to-fine reload draws, under `memory="streaming"`: TimeScope), answer-format examples (the warm start of
    Invert4TVG), or GRPO's decoded frames (its prompts are built per step)."""
    encoder_config = EncoderConfig.from_config(config, train=True)
    if config.method == "invert4tvg":
        return grpo.RolloutTransform({s.id: i for i, s in enumerate(train_samples)})
    if config.method == "answer_sft":
        return grpo.WarmStartTransform(
            ChatEncoder(checkpoint, encoder_config, video_first=settings.video_first(config)),
            thinking=config.answer.thinking,
            inversion_fraction=config.warm_start.inversion_fraction,
            inversion_tasks=tuple(config.grpo.inversion_tasks),
            seed=config.seed,
            time_pointers=config.train.st_weight > 0,
        )
    encoder = StructuralEncoder(checkpoint, encoder_config)
    if config.memory == "streaming":
        return StreamedEncoder(
            encoder, StreamingConfig.from_config(config), CoarseToFineConfig.from_config(config), config.seed
        )
    return encoder


def warm_start_config(config):
    """The supervised warm start of a GRPO config: the same model and data, the answer format's SFT objective,
    `warm_start.steps` steps at `warm_start.learning_rate`, exported as an HF checkpoint GRPO starts from."""
    warm = config.copy_and_resolve_references()
    structural = settings.answer_format(config) == "structural"
    with warm.unlocked():
        # Structural answers are MeCo's: its SFT (LM + L_ST) teaches the format and trains the heads that read it.
        warm.method = "meco" if structural else "answer_sft"
        warm.train.steps = config.warm_start.steps
        # Text answers: the time pointers' weight (`WarmStartTransform.time_pointers`), 0 to train the answer alone.
        warm.train.st_weight = config.train.st_weight if structural else config.warm_start.pointer_weight
        warm.train.export = True
        warm.train.log_every = 50
        warm.train.checkpoint_every = config.warm_start.steps
        warm.optimizer.learning_rate = config.warm_start.learning_rate
        warm.optimizer.warmup_fraction = config.warm_start.warmup_fraction
    return warm


def after_warm_start(config, warm_workdir: str):
    """`config` starting from the warm start's exported model."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.checkpoint = paths.join(warm_workdir, "export")
    return config


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def build_trainer(config, model: GroundingModel, tokenizer, checkpoint: str, samples=(), mesh=None) -> Trainer:
    """The trainer of `config.method`'s registered objective for `model` (`checkpoint`: the base checkpoint
    directory; `samples`: the training samples, which GRPO looks its rollout prompts up in)."""
    objective = make_objective(config.method, config, model.llm.config, checkpoint, samples)
    return Trainer(model, objective, TrainerConfig.from_config(config), [tokenizer.ent_id, tokenizer.tst_id], mesh=mesh)


def build_model(config, checkpoint: str, mesh=None):
    """(GroundingModel, tokenizer): the checkpoint plus <ent>/<tst> rows, heads and LoRA."""
    tokenizer = load_tokenizer(checkpoint)
    param_dtype, compute_dtype = settings.model_dtypes(config)
    llm = jm.from_pretrained(
        checkpoint,
        dtype=param_dtype,
        compute_dtype=compute_dtype,
        mesh=mesh,
        remat_policy=config.model.remat_policy,
        attention=config.model.attention,
    )
    heads = _heads_file(checkpoint)
    # An exported grounding model (export_hf, with its heads file) carries trained <ent>/<tst> rows; a base
    # checkpoint's rows for them are untrained padding (or missing) and start from the mean of the others.
    exported = os.path.isfile(heads)
    if not exported:
        init_token_rows(llm, [tokenizer.ent_id, tokenizer.tst_id], tokenizer.base_vocab_size)
    if config.trainable.llm == "lora":
        apply_lora(
            llm,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            targets=tuple(config.lora.targets),
            dropout=config.lora.dropout,
            seed=config.seed,
        )
    model = GroundingModel(llm, rngs=nnx.Rngs(config.seed))
    if exported:  # it continues with its trained heads too
        load_heads(model, heads)
    return model, tokenizer


# MeCo's projector heads in an export: not an HF module, so in a folder of their own that transformers and vLLM
# never read (they load the top-level safetensors as the model's).
HEADS_FILE = "structural_heads/model.safetensors"
# Where exports before it kept them, beside the model's weights.
_LEGACY_HEADS_FILE = "structural_heads.safetensors"


def _heads_file(checkpoint: str) -> str:
    """Path of the heads of an export in `checkpoint` (absent from a base checkpoint). An export in the old layout
    is refused: read as a base checkpoint it would silently lose its trained heads and <ent>/<tst> rows."""
    legacy = os.path.join(checkpoint, _LEGACY_HEADS_FILE)
    if os.path.isfile(legacy):
        raise FileNotFoundError(
            f"{legacy}: an export in the old layout; move it to {os.path.join(checkpoint, HEADS_FILE)}"
        )
    return os.path.join(checkpoint, HEADS_FILE)


def load_heads(model: GroundingModel, path: str) -> None:
    """Sets `model.heads` from a file `export_hf` wrote; every head parameter must be there with its shape."""
    from jaxgrounding.model.weights import read_safetensors

    stored = read_safetensors(path)
    flat = nnx.to_flat_state(nnx.state(model.heads))
    for key, variable in flat:
        name = ".".join(map(str, key))
        if name not in stored:
            raise ValueError(f"{path}: no tensor {name!r} (has {sorted(stored)})")
        value, want = stored[name], variable.get_value()
        if value.size != want.size or value.squeeze().shape != want.squeeze().shape:  # a scalar is stored as [1]
            raise ValueError(f"{path}: {name} has shape {value.shape}, the model's is {want.shape}")
        variable.set_value(jnp.asarray(value.reshape(want.shape), want.dtype))


# ------------------------------------------------------------------------------------------------
# Restore, export
# ------------------------------------------------------------------------------------------------


def restore_model(config, workdir: str):
    """(model, tokenizer, checkpoint dir, step) of the latest checkpoint in `workdir`."""
    name = checkpoint_name(config)
    if name:
        checkpoint_dir = local_checkpoint(name)
    else:
        checkpoint_dir = paths.local_cache(workdir, "tiny_model")
        if paths.isdir(paths.join(workdir, "tiny_model")):
            paths.download(paths.join(workdir, "tiny_model"), checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir}: base checkpoint not found (was {workdir} trained?)")
    model, tokenizer = build_model(config, checkpoint_dir)
    # The trainer gives the exact structure the checkpoint was written with.
    trainer = build_trainer(config, model, tokenizer, checkpoint_dir)
    checkpointer = Checkpointer(workdir_lib.checkpoints(workdir), save_every=1)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to evaluate")
    state, _ = checkpointer.restore(
        TrainState(params=trainer.trainable, opt_state=trainer.opt_state, step=0, rng=jax.random.key(0))
    )
    checkpointer.close()
    trainer.trainable = state.params
    return trainer.model(), tokenizer, checkpoint_dir, step


def load_workdir_config(workdir: str):
    """The config a workdir was trained with (written by train.py)."""
    import ml_collections

    path = paths.join(workdir, "config.json")
    if not paths.isfile(path):
        raise FileNotFoundError(f"{path}: not a jaxgrounding workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(paths.read_text(path)))


def export_hf(model: GroundingModel, tokenizer, path: str, checkpoint: str) -> None:
    """Writes the merged model as an HF checkpoint that transformers' AutoProcessor and model classes (and vLLM)
    load: config.json + safetensors (LoRA folded into the kernels, <ent>/<tst> rows included), the tokenizer with
    the structural tokens and the chat template, the image and video processor configs of the base `checkpoint`
    the model was built from, and MeCo's projector heads in `HEADS_FILE`."""
    import copy

    from jaxgrounding.model.lora import merge_lora
    from jaxgrounding.model.processor import write_processor_configs
    from jaxgrounding.model.weights import write_safetensors

    llm = copy.deepcopy(model.llm)
    merge_lora(llm)
    heads = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model.heads))}
    # Written locally, then uploaded whole where `path` is remote (the writers need local files).
    with paths.Staged(path) as local:
        jm.save_pretrained(llm, local)
        tokenizer.tokenizer.save_pretrained(local)
        _keep_chat_template(checkpoint, local)
        write_processor_configs(checkpoint, local, llm.config.model_type)
        os.makedirs(os.path.dirname(os.path.join(local, HEADS_FILE)), exist_ok=True)
        write_safetensors(os.path.join(local, HEADS_FILE), heads)


# Where transformers' processors read a chat template: the current file, then the legacy one.
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _keep_chat_template(checkpoint: str, export: str) -> None:
    """The export's chat template is the tokenizer's (the one our prompts are formatted with), which
    `save_pretrained` wrote; a tokenizer without one leaves the base checkpoint's processor template to copy."""
    if any(os.path.isfile(os.path.join(export, name)) for name in _CHAT_TEMPLATE_FILES):
        return
    for name in _CHAT_TEMPLATE_FILES:
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), os.path.join(export, name))
            return
