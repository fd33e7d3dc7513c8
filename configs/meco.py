"""MeCo: structural tokens (<ent>/<tst>) with query-focused captions, LM + L_ST, frame assignment.

    python -m jaxgrounding.train --config configs/meco.py --workdir runs/meco

With no argument: a tiny Qwen2.5-VL trained from scratch on the built-in synthetic grounding set
(minutes on one CPU machine). A real checkpoint and dataset:

    python -m jaxgrounding.train --config configs/meco.py:model=qwen2_5_vl_3b,data=charades_sta \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.root=/data/charades \
        --workdir runs/meco
"""

import dataclasses

import ml_collections

from jaxgrounding.config import apply_presets
from jaxgrounding.data.synthetic_scenes import SceneConfig
from jaxgrounding.model import presets

# MeCo's stage-3 recipe (REFERENCE.md): LoRA r=128, alpha=256 on q/k/v/o, lr 2e-5 / LoRA 5e-5, frozen
# vision tower, global batch 32. Weights are kept in float32 (the optimizer's master copy) and the
# forward and backward run in bf16 (norm and softmax statistics, rotary, logits and losses stay in float32).
# The model size comes from --config.model.checkpoint.
MECO_RECIPE = {
    "model.dtype": "float32",
    "model.compute_dtype": "bfloat16",
    "trainable.llm": "lora",
    "trainable.vision": False,
    "optimizer.learning_rate": 2e-5,
    "optimizer.lora_learning_rate": 5e-5,
    "train.batch_size": 32,
    "data.frame_size": (252, 448),
    "data.fps": 1.0,
    "data.max_frames": 128,
    "encoder.max_tokens": 8192,
    "assignment.dilation": 1,  # the reference evaluation's value
}

PRESETS = {
    "model": {
        "tiny": {},
        "qwen2_5_vl_3b": MECO_RECIPE | {"model.preset": "qwen2_5_vl_3b"},
        "qwen2_5_vl_7b": MECO_RECIPE | {"model.preset": "qwen2_5_vl_7b"},
    },
    "data": {
        "synthetic": {},
        # The README's "Datasets" section gives each preset's layout and where its files come from.
        "charades_sta": {
            "data.name": "charades_sta",
            "data.train_annotations": "charades_sta_train.txt",
            "data.eval_annotations": "charades_sta_test.txt",
            "data.video_root": "Charades_v1_480",
            # Each split's video lengths are in its own Charades csv.
            "data.train_durations": "Charades_v1_train.csv",
            "data.eval_durations": "Charades_v1_test.csv",
        },
        "qvhighlights": {
            "data.name": "qvhighlights",
            "data.train_annotations": "highlight_train_release.jsonl",
            "data.eval_annotations": "highlight_val_release.jsonl",
            "data.video_root": "videos",
        },
        "activitynet": {
            "data.name": "activitynet",
            "data.train_annotations": "train.json",
            "data.eval_annotations": "val_2.json",
            "data.video_root": "videos",
        },
    },
}


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.method = "meco"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    # A real model preset (model=qwen2_5_vl_7b) sets the recipe; its weights come from model.checkpoint,
    # without which the run stops at once (jaxgrounding.training.experiment.checkpoint_name).
    config.model.preset = "tiny"
    # HF checkpoint: a directory or a hub id (Qwen/Qwen2.5-VL-7B-Instruct, resolved through the hub cache,
    # HF_HUB_OFFLINE honoured); "" with the tiny preset builds the tiny default in the workdir.
    config.model.checkpoint = ""
    config.model.dtype = "float32"  # parameter dtype
    # Activation and matmul dtype: "auto" (= model.dtype), "float32" or "bfloat16". Norm and softmax statistics,
    # rotary, the LM head's logits and the losses run in float32 whatever this is.
    config.model.compute_dtype = "auto"
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    # Attention implementation: "auto" (blocked on CPU, cuDNN on GPU, Pallas splash on TPU), or one of
    # blocked | xla | cudnn | splash (jaxgrounding/model/attention.py).
    config.model.attention = "auto"
    # Sizes of the tiny default model (jaxgrounding.model.presets.tiny), used when no checkpoint is given.
    config.model.tiny = ml_collections.ConfigDict(presets.TINY_SIZES)

    config.trainable = ml_collections.ConfigDict()
    config.trainable.llm = "full"  # "full" | "lora" | "frozen"
    config.trainable.vision = True  # the tiny model starts from random weights: train its eyes too
    config.trainable.embeddings = "new_tokens"  # with LoRA / frozen LLM: train only the <ent>/<tst> rows

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 128
    config.lora.alpha = 256.0
    config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    config.lora.dropout = 0.05  # on the adapter input, training only (MeCo's value)

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # or a format of jaxgrounding.data.load_annotations
    config.data.root = ""  # dataset directory; "" = workdir/../data/synthetic-<hash of its config> for the synthetic set
    config.data.train_annotations = ""
    config.data.eval_annotations = ""
    config.data.video_root = ""
    config.data.train_durations = ""  # Charades-STA: the csv of video lengths ("" = probe each video)
    config.data.eval_durations = ""
    config.data.fps = 1.0
    config.data.max_frames = 64
    config.data.frame_size = (56, 56)  # every frame is resized to this (multiples of 28)
    config.data.workers = 0  # grain decode processes (0 = in the training process)
    # Samples that fail to decode or encode are skipped and counted; more than this fraction of the
    # samples read failing stops training with the reasons.
    config.data.max_failure_fraction = 0.05
    # An annotation line that does not parse: "raise" (naming file and line) or "skip" it (counted).
    config.data.on_bad_line = "raise"
    # Annotation video paths must stay inside video_root (no ../ or absolute paths) unless allowed.
    config.data.allow_outside_video_root = False
    # A video whose decoded duration differs from its annotation's by more than this fraction (and 1 s)
    # is skipped and counted: its windows were measured on another file.
    config.data.max_duration_error = 0.1
    config.data.synthetic_name = "synthetic"  # directory of the built-in set (next to the workdir)
    config.data.synthetic_train_videos = 500
    config.data.synthetic_eval_videos = 100
    # jaxgrounding.data.synthetic_scenes.SceneConfig of the synthetic set; every field is listed, so
    # each can be overridden from the command line (--config.data.scene.object_scale=0.2).
    # The family is the learnable one: transient events (every frame of a window shows the change on
    # its own) and a 2 x 2 layout that puts each resting object in one of the 2 x 2 visual tokens of a
    # 56-px frame.
    config.data.scene = ml_collections.ConfigDict(dataclasses.asdict(SceneConfig()))

    # How a prompt runs through the decoder in training and evaluation: "full" (one causal pass) or
    # "streaming" (TimeScope: segment by segment into HVR/DVR memory, coarse-to-fine grounding, configs/timescope.py).
    config.memory = "full"

    # TimeScope's streaming memory: used with memory="streaming", and by `ground --memory streaming` for any
    # model. The buffer holds data.max_frames (max_segments = data.max_frames / 2 / segment_frames).
    config.streaming = ml_collections.ConfigDict()
    config.streaming.segment_frames = 8  # temporal grids per segment (16 frames)
    config.streaming.hvr_temporal = 4  # r: grids pooled into one HVR grid
    config.streaming.hvr_spatial = 1  # tokens pooled within a grid
    config.streaming.hvr_impl = "auto"  # Pallas kernel on GPU/TPU, jnp reference on CPU
    config.streaming.recent_segments = 0  # preceding segments a segment also sees in full (Video-XL-2: 3)
    config.streaming.dvr_placement = "auto"  # device | pinned_host | host | auto

    config.coarse_to_fine = ml_collections.ConfigDict()
    config.coarse_to_fine.margin = 4.0  # seconds around the coarse window
    config.coarse_to_fine.max_reload_segments = 4
    config.coarse_to_fine.fine_fraction = 0.5  # streamed training samples built as fine-stage samples
    config.coarse_to_fine.jitter = 0.5

    config.encoder = ml_collections.ConfigDict()
    config.encoder.task = "grounding"
    config.encoder.max_tokens = 2048
    # Each frame's start time as text before it ("<12.0 seconds>", Qwen3-VL's layout). Qwen2.5-VL reads time
    # from M-RoPE's absolute temporal ids and was not trained with these texts.
    config.encoder.frame_time_text = False

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 8
    # The tiny default on 2 CPU cores: 1200 steps in 8.5 min with held-out synthetic R1@0.5 72.7;
    # 1500 steps gave 72-79 but took 10.3 min on the same (slow) day.
    config.train.steps = 1200
    config.train.accumulate = 1
    config.train.st_weight = 1.0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    # After SIGTERM the loop saves at the next step boundary; one not reached within this many seconds
    # (a stuck read, a hung collective) exits without saving, keeping the newest committed checkpoint.
    config.train.sigterm_grace_s = 120.0
    config.train.export = True  # workdir/export: the merged model as an HF checkpoint

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.lora_learning_rate = 1e-3
    config.optimizer.warmup_fraction = 0.03
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip = 1.0

    config.sampling = ml_collections.ConfigDict()
    config.sampling.max_new_tokens = 48
    config.sampling.temperature = 0.0  # greedy at evaluation (MeCo samples at 0.2)
    config.sampling.top_p = 1.0

    config.assignment = ml_collections.ConfigDict()
    config.assignment.threshold = 0.7
    # No dilation here: a model "frame" is a temporal grid of 2 s at 1 fps, so dilating by one adds
    # 4 s to windows of 2-18 s (R1@0.5 73 -> 59 on the synthetic set); real presets keep the 1.
    config.assignment.dilation = 0
    config.assignment.nms_iou = 0.7

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 16
    config.eval.max_samples = 0  # 0 = the whole split
    config.eval.inclusive = True  # R1@m counts IoU >= m (Invert4TVG) rather than > m (Time-R1)
    # Streamed (TimeScope) evaluation also grounds each video in one causal pass over all of it, reported as
    # `single_*` beside the coarse and fine stages; off for videos whose full prompt does not fit the device.
    config.eval.single_stage = True

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1
    config.mesh.fsdp = -1  # the remaining devices
    config.mesh.tensor = 1

    return apply_presets(config, arg, PRESETS)
