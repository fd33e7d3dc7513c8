"""Invert4TVG: GRPO on temporal grounding (Time-R1's answer format and rewards) plus inversion tasks.

    python -m jaxgrounding.train --config configs/invert4tvg.py --workdir runs/grpo

With no argument: a tiny Qwen2.5-VL on the built-in synthetic set (videos with a burned-in clock, see
`SceneConfig.clock`), first a short supervised warm start in the answer format (its evaluation is
DIR/eval_init), then GRPO with G samples per prompt and the inversion tasks (evaluation: DIR/eval).
A real checkpoint and dataset, with the paper's settings:

    python -m jaxgrounding.train --config configs/invert4tvg.py:model=qwen2_5_vl_7b,data=charades_sta \
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.root=/data/charades \
        --workdir runs/grpo

`:recipe=time_r1` gives Time-R1's settings instead (distance-weighted IoU; `recipe=time_r1_charades`: its
Charades fine-tune, plain IoU and no KL).
"""

import ml_collections

from configs import meco
from jaxgrounding.config import apply_presets

# Invert4TVG (sec. 4.1): Qwen2.5-VL, 2 fps, ~2.8M pixels per video, G = 8, beta 0.04, AdamW (0.9, 0.999,
# 1e-8) lr 5e-5, weight decay 0, clipping 1.0, batch 4, 2 epochs; TRL 0.17's defaults ("bnpo").
# float32 master weights, bf16 compute (as MECO_RECIPE).
INVERT4TVG_RECIPE = {
    "model.dtype": "float32",
    "model.compute_dtype": "bfloat16",
    "trainable.llm": "full",
    "trainable.vision": False,
    "optimizer.learning_rate": 5e-5,
    "optimizer.warmup_fraction": 0.0,
    "grpo.temperature": 1.0,
    "train.batch_size": 4,
    "data.fps": 2.0,
    # The paper's pixel budget, 3584 * 28 * 28 (~2.8M) per video: 224 frames of 112 x 112 (fixed frame size here).
    "data.max_frames": 224,
    "data.frame_size": (112, 112),
    "encoder.max_tokens": 16384,
    "grpo.max_new_tokens": 512,
    "warm_start.steps": 0,  # a pretrained checkpoint already answers in the format
}

PRESETS = {
    "model": {
        "tiny": {},
        "qwen2_5_vl_3b": INVERT4TVG_RECIPE | {"model.preset": "qwen2_5_vl_3b"},
        "qwen2_5_vl_7b": INVERT4TVG_RECIPE | {"model.preset": "qwen2_5_vl_7b"},
    },
    "data": meco.PRESETS["data"],
    "recipe": {
        "invert4tvg": {},
        # Time-R1 post-training: distance-weighted IoU ("iou_v2") + format.
        "time_r1": {"grpo.iou": "distance_weighted", "grpo.grounding_prob": 1.0},
        # Time-R1's Charades fine-tune: plain IoU, no KL term, 1024 new tokens.
        "time_r1_charades": {"grpo.grounding_prob": 1.0, "grpo.beta": 0.0, "grpo.max_new_tokens": 1024},
    },
}


def get_config(arg=None):
    config = meco.get_config()
    config.method = "invert4tvg"

    # The synthetic set with a clock on every frame (see the module docstring), kept apart from MeCo's.
    config.data.synthetic_name = "synthetic_clock"
    config.data.scene.clock = True
    # Short videos with one event each: 4-8 temporal grids, the event 20-40% of the video. On 20-60 s videos with up
    # to two events the tiny model's warm start did not learn to write times that follow the video within the time
    # budget, pointers or not (README).
    config.data.scene.min_duration = 8.0
    config.data.scene.max_duration = 16.0
    config.data.scene.max_events = 1
    config.data.scene.min_event_fraction = 0.2
    config.data.scene.max_event_fraction = 0.4
    config.data.synthetic_train_videos = 1000
    config.data.synthetic_eval_videos = 150

    config.answer = ml_collections.ConfigDict()
    # "timestamps": Time-R1's "<answer> start to end </answer>"; "structural": MeCo's <ent>/<tst> answer, warm-started
    # by MeCo's SFT (LM + L_ST) and rewarded by the IoU of its top window (grounding only: grpo.grounding_prob = 1).
    config.answer.format = "timestamps"
    config.answer.thinking = False  # the tiny model answers directly; real presets reason in <think>

    # The supervised warm start in the answer format (a tiny model from scratch knows no format).
    config.warm_start = ml_collections.ConfigDict()
    config.warm_start.steps = 3000
    config.warm_start.learning_rate = 1e-3
    config.warm_start.warmup_fraction = 0.03
    config.warm_start.inversion_fraction = 0.2  # share of warm-start examples that are inversion tasks
    # Weight of the time pointers (objectives.pointer): the last layer's attention from the states writing the start /
    # end numbers is trained onto the grids where the window starts / ends; 0: the answer tokens alone, from which the
    # tiny model learns to answer from the query and the video's length only (README).
    config.warm_start.pointer_weight = 1.0

    config.grpo = ml_collections.ConfigDict()
    config.grpo.num_samples = 8  # G
    # Rollouts at 0.6 on the tiny default: at the papers' 1.0 its GRPO widened the windows (held-out mIoU 56.1 ->
    # 55.6 / 56.0 after 150 / 300 steps, R1@0.7 38 -> 25), at 0.6 it sharpened them (-> 60.1). Real presets: 1.0.
    config.grpo.temperature = 0.6
    config.grpo.top_p = 1.0
    config.grpo.max_new_tokens = 24
    config.grpo.num_iterations = 1
    config.grpo.beta = 0.04
    config.grpo.epsilon_low = 0.2
    config.grpo.epsilon_high = 0.2
    config.grpo.kl = "k3"
    config.grpo.loss_type = "bnpo"
    config.grpo.importance_sampling = "token"
    config.grpo.scale_rewards = "group"
    config.grpo.advantage_estimator = "grpo"
    config.grpo.grounding_prob = 0.8
    config.grpo.inversion_tasks = ("verb_completion", "action_recognition", "video_description")
    config.grpo.iou = "plain"
    # Reward names (jaxgrounding.tasks.rewards' registry, where `register_reward` adds a user's own), summed per
    # completion over those that apply to its task. (): the answer format's own, Invert4TVG's five for
    # "timestamps" (IoU + format for grounding, each inversion task's + format) and "structural_iou" +
    # "structural_format" for "structural".
    config.grpo.rewards = ()

    config.train.batch_size = 4
    config.train.steps = 300
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.export = False
    config.optimizer.learning_rate = 5e-5  # the paper's
    config.optimizer.warmup_fraction = 0.0
    # AdamW as the paper (beta 0.9 / 0.999, eps 1e-8) is optax's default; weight decay 0, clipping 1.0.
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip = 1.0

    config.sampling.max_new_tokens = 24  # evaluation: greedy, as Time-R1's evaluation
    config.sampling.temperature = 0.0
    config.eval.batch_size = 16
    # Ask every grounding question again over another video of the same length (`evaluation.video_swaps`) and report
    # `shuffled_video_*` and `answers_changed`: whether the answers come from the video or from the query and length.
    config.eval.shuffled_video = True
    return apply_presets(config, arg, PRESETS)
