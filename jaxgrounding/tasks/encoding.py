"""Sample + decoded Video -> the arrays of one structural-token (MeCo) example, in numpy.

This is the model-side transform of the grain pipeline (it runs in the data workers):

- frames arrive decoded at one fixed size (`read_video(size=frame_size)`, so every example has
  the same patch grid per frame and batches differ only in frame count, which the pipeline
  pads to a bucket) and are cut into Qwen2-VL patches by `VisualProcessor`;
- the prompt is the checkpoint's chat template with the video placeholder expanded to one
  `<|video_pad|>` per visual token, followed by a task instruction;
- the response is MeCo's structural text (`tasks.structural.structural_response`) ended by the
  template's end-of-turn token; the LM loss covers the response only;
- for L_ST: the position that predicts each structural token, its kind, and the range of
  temporal grids ("frames" of the model) its window covers; which grid each visual token
  belongs to;
- M-RoPE positions (absolute time from the true sampled fps) are computed here, on the host;
- with `frame_time_text`, every temporal grid is preceded by its start time as text
  (`<12.0 seconds><|vision_start|>...<|vision_end|>`, the layout Qwen3-VL reads time from), each grid its
  own vision block.

A "frame" of the model is one temporal grid: `temporal_patch_size` consecutive sampled frames.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.positions import rope_positions
from jaxgrounding.model.processor import VisualProcessor
from jaxgrounding.model.tokenizer import load_tokenizer
from jaxgrounding.tasks import structural, templates

KIND_IDS = {"ent": 1, "tst": 2}  # 0 is padding


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """task: instruction family (templates.TASKS); frame_size: (H, W) every frame is resized to
    (multiples of 28); max_tokens: longest sequence allowed; random_instruction: draw the
    instruction phrasing at random (training) or take the first (evaluation); frame_time_text: write each
    temporal grid's start time as text before it (`frame_time_text`)."""

    task: str
    frame_size: tuple[int, int]
    max_tokens: int
    random_instruction: bool
    seed: int
    frame_time_text: bool

    @classmethod
    def from_config(cls, config, *, train: bool) -> EncoderConfig:
        """From the config's `encoder` and `data` sections (configs/meco.py); training draws its phrasings."""
        return cls(
            task=config.encoder.task,
            frame_size=tuple(config.data.frame_size),
            max_tokens=config.encoder.max_tokens,
            random_instruction=train,
            seed=config.seed,
            frame_time_text=config.encoder.frame_time_text,
        )


def frame_time_text(seconds: float) -> str:
    """The text written before a temporal grid that starts at `seconds` (Qwen3-VL's "<t seconds>" with one
    decimal): a model reads absolute time from these tokens instead of from M-RoPE's temporal ids alone."""
    return f"<{seconds:.1f} seconds>"


class StructuralEncoder:
    """Picklable (grain workers): holds the checkpoint path, loads tokenizer and config lazily."""

    def __init__(self, checkpoint: str, config: EncoderConfig):
        self.checkpoint = checkpoint
        self.config = config
        self._loaded = None

    def __getstate__(self):
        return {"checkpoint": self.checkpoint, "config": self.config, "_loaded": None}

    def _load(self):
        if self._loaded is None:
            tokenizer = load_tokenizer(self.checkpoint)
            model_config = ModelConfig.from_pretrained(self.checkpoint)
            processor = VisualProcessor.from_pretrained(
                self.checkpoint, max_pixels=max(self.config.frame_size[0] * self.config.frame_size[1], 56 * 56)
            )
            self._loaded = (tokenizer, model_config, processor)
        return self._loaded

    @property
    def tokenizer(self):
        return self._load()[0]

    @property
    def model_config(self) -> ModelConfig:
        return self._load()[1]

    def video_prefix(self) -> np.ndarray:
        """The tokens every video-first prompt starts with, up to the video (system turn, <|vision_start|>)."""
        if self.config.frame_time_text:
            # Streaming cuts the prompt into one vision block per segment; time texts between grids would
            # have to travel with the segments, which the streamed layout does not carry.
            raise ValueError("encoder.frame_time_text is not supported with streamed memory (memory='streaming')")
        ids = np.asarray(self._prompt_ids("", 1), np.int32)
        return ids[: int(np.argmax(ids == self.model_config.video_token_id))]

    # ------------------------------------------------------------------------------------------

    def _visual(self, sample, video):
        _, _, processor = self._load()
        frames = np.asarray(video.frames)
        if frames.shape[1:3] != tuple(self.config.frame_size):
            # Resizing is the decoder's job (read_video(size=...), which the pipeline config asks for).
            raise ValueError(
                f"sample {sample.id}: frames are {frames.shape[1]}x{frames.shape[2]}, the encoder expects "
                f"{self.config.frame_size[0]}x{self.config.frame_size[1]}: decode with read_video(size=frame_size)"
            )
        return processor.video(frames, fps=float(video.fps))

    def _prompt_ids(
        self, instruction: str, num_visual_tokens: int, text_first: bool = False, grid_times=None
    ) -> list[int]:
        """The chat-templated user turn: the video then the instruction (MeCo), or with `text_first`
        the instruction then the video (Time-R1's training prompt). With `grid_times` (one start time per
        temporal grid), the video is one vision block per grid, each preceded by its time text."""
        tokenizer, config, _ = self._load()
        content = [{"type": "video"}, {"type": "text", "text": instruction}]
        messages = [{"role": "user", "content": content[::-1] if text_first else content}]
        text = tokenizer.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pad = "<|video_pad|>"
        if text.count(pad) != 1:
            raise ValueError(f"{self.checkpoint}: the chat template must place exactly one {pad} per video")
        if grid_times is None:
            text = text.replace(pad, pad * num_visual_tokens)
        else:
            block = f"<|vision_start|>{pad}<|vision_end|>"
            if text.count(block) != 1:
                raise ValueError(f"{self.checkpoint}: frame_time_text needs the video as {block} in the chat template")
            per_grid = num_visual_tokens // len(grid_times)
            grids = "".join(
                f"{frame_time_text(t)}<|vision_start|>{pad * per_grid}<|vision_end|>" for t in grid_times
            )
            text = text.replace(block, grids)
        return tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _grid_times(self, video, visual):
        """Each temporal grid's start time when the prompt writes them (`frame_time_text`), else None."""
        if not self.config.frame_time_text:
            return None
        return _grid_start_times(video, visual, self._load()[1])

    def _instruction(self, sample) -> str:
        rng = None
        if self.config.random_instruction:
            # crc32, not hash(): Python salts str hashes per process, and workers must agree.
            rng = np.random.default_rng([self.config.seed, zlib.crc32(sample.id.encode())])
        return templates.instruction(self.config.task, sample.query, rng)

    def encode_prompt(self, sample, video) -> dict[str, np.ndarray]:
        """Inference inputs: the prompt only, plus what is needed to read the answer back."""
        _, config, _ = self._load()
        visual = self._visual(sample, video)
        ids = np.asarray(
            self._prompt_ids(self._instruction(sample), visual.num_tokens, grid_times=self._grid_times(video, visual)),
            np.int32,
        )
        return self._common(ids, visual, video, config) | {"duration": np.float32(sample.duration)}

    def __call__(self, sample, video, epoch: int) -> dict[str, np.ndarray]:
        """Training example (see module docstring); the instruction's phrasing is drawn per sample, whatever the
        epoch."""
        del epoch
        tokenizer, config, _ = self._load()
        visual = self._visual(sample, video)
        prompt = self._prompt_ids(
            self._instruction(sample), visual.num_tokens, grid_times=self._grid_times(video, visual)
        )
        text, tokens = structural.structural_response(sample.windows, sample.captions, sample.duration)
        response = tokenizer.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = np.asarray(prompt + response, np.int32)
        if ids.shape[0] > self.config.max_tokens:
            raise ValueError(
                f"sample {sample.id}: {ids.shape[0]} tokens exceed max_tokens={self.config.max_tokens} "
                "(lower the fps / max_frames or the frame size)"
            )
        loss_mask = np.zeros(ids.shape, bool)
        loss_mask[len(prompt) :] = True

        kind_of_id = {tokenizer.ent_id: "ent", tokenizer.tst_id: "tst"}
        where = [i for i in range(len(prompt), len(ids)) if int(ids[i]) in kind_of_id]
        if [kind_of_id[int(ids[i])] for i in where] != [t.kind for t in tokens]:
            raise ValueError(f"sample {sample.id}: structural tokens of the response did not tokenize as single tokens")
        example = self._common(ids, visual, video, config)
        targets = structural.token_frame_targets(tokens, example["grid_times"], float(example["grid_duration"]))
        ranges = np.zeros((len(tokens), 2), np.int32)
        for k, row in enumerate(targets):
            covered = np.flatnonzero(row > 0)
            ranges[k] = (covered[0], covered[-1])
        return example | {
            "loss_mask": loss_mask,
            # The state that predicts token i sits at position i - 1 (MeCo eq. 4).
            "struct_positions": np.asarray(where, np.int32) - 1,
            "struct_kinds": np.asarray([KIND_IDS[t.kind] for t in tokens], np.int32),
            "struct_ranges": ranges,
            "windows": np.asarray(sample.windows, np.float32).reshape(-1, 2),
            "duration": np.float32(sample.duration),
            "id": np.asarray(sample.id),
        }

    def _common(self, ids, visual, video, config: ModelConfig) -> dict[str, np.ndarray]:
        grid = visual.grid_thw
        if self.config.frame_time_text:
            # One vision block per temporal grid, as Qwen3-VL lays them out: each its own [1, h, w] grid.
            grids = np.tile([1, grid[1], grid[2]], (int(grid[0]), 1))
            seconds = np.full(int(grid[0]), visual.second_per_grid)
        else:
            grids, seconds = grid[None], np.array([visual.second_per_grid])
        positions, _ = rope_positions(ids[None], config, video_grid_thw=grids, second_per_grid_ts=seconds)
        tokens_per_grid = int(grid[1] * grid[2]) // config.vision.spatial_merge_size**2
        frame_of_token = np.full(ids.shape, -1, np.int32)
        video_slots = np.flatnonzero(ids == config.video_token_id)
        frame_of_token[video_slots] = np.arange(video_slots.shape[0]) // tokens_per_grid
        grid_times = _grid_start_times(video, visual, config)
        return {
            "input_ids": ids,
            "positions": positions[:, 0].T.copy(),  # [T, 3] so the pipeline pads along time
            "frame_of_token": frame_of_token,
            "pixel_values": visual.pixel_values.astype(np.float32),
            "grid_times": grid_times,
            "grid_duration": np.float32(visual.second_per_grid),  # seconds one grid spans
        }


def _grid_start_times(video, visual, config: ModelConfig) -> np.ndarray:
    # A grid starts at its first sampled frame; padding frames (odd counts) repeat the last one.
    timestamps = np.asarray(video.timestamps, np.float32)
    return timestamps[:: config.vision.temporal_patch_size][: int(visual.grid_thw[0])]


def clip(video, window: tuple[float, float]):
    """The frames of `video` inside `window` (seconds), timestamps kept absolute, at least two frames
    (one temporal grid): the inversion tasks see the ground-truth clip only (Invert4TVG, sec. 3.2)."""
    times = np.asarray(video.timestamps)
    inside = np.flatnonzero((times >= window[0] - 1e-6) & (times <= window[1] + 1e-6))
    if inside.size < 2:
        centre = int(np.argmin(np.abs(times - (window[0] + window[1]) / 2)))
        first = min(max(centre - 1 + (inside.size == 1), 0), max(len(times) - 2, 0))
        inside = np.arange(first, min(first + 2, len(times)))
    return dataclasses.replace(video, frames=video.frames[inside], timestamps=times[inside])


class ChatEncoder(StructuralEncoder):
    """Prompt + free-text response examples (Time-R1 / Invert4TVG): the instruction comes before the
    video in the user turn, the response is plain text ended by the end-of-turn token, and the LM loss
    covers the response. What the prompt and response say is the caller's (`tasks.timestamps`,
    `tasks.inversion`); this class only turns them into arrays, in the layout `StructuralEncoder` uses
    (so the same batching, vision plan and model inputs apply).

    `video_first`: the video before the instruction instead, as a streamed prompt needs (TimeScope streams the
    video into memory, then asks)."""

    def __init__(self, checkpoint: str, config: EncoderConfig, *, video_first: bool = False):
        super().__init__(checkpoint, config)
        self.video_first = video_first

    def prompt(self, instruction: str, video, sample_id: str = "") -> dict[str, np.ndarray]:
        _, config, _ = self._load()
        visual = self._visual_of(video)
        ids = np.asarray(
            self._prompt_ids(
                instruction, visual.num_tokens, not self.video_first, grid_times=self._grid_times(video, visual)
            ),
            np.int32,
        )
        self._check_length(ids, sample_id)
        return self._common(ids, visual, video, config)

    def example(
        self, instruction: str, video, response: str, sample_id: str = "", marks: tuple[int, ...] = ()
    ) -> dict[str, np.ndarray]:
        """A supervised example: prompt + response, `loss_mask` on the response tokens. `marks`: character offsets
        into `response`; for each, `struct_positions` holds the index of the state that predicts the response
        token covering it (the states an auxiliary L_ST reads)."""
        tokenizer, config, _ = self._load()
        visual = self._visual_of(video)
        prompt = self._prompt_ids(
            instruction, visual.num_tokens, not self.video_first, grid_times=self._grid_times(video, visual)
        )
        encoded = tokenizer.tokenizer(response + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
        answer = encoded["input_ids"]
        ids = np.asarray(prompt + answer, np.int32)
        self._check_length(ids, sample_id)
        loss_mask = np.zeros(ids.shape, bool)
        loss_mask[len(prompt) :] = True
        example = self._common(ids, visual, video, config) | {"loss_mask": loss_mask}
        if marks:
            spans = encoded["offset_mapping"]
            covering = [next(k for k, (a, b) in enumerate(spans) if a <= m < b) for m in marks]
            # The state that predicts token i sits at position i - 1.
            example["struct_positions"] = np.asarray(covering, np.int32) + len(prompt) - 1
        return example

    def _check_length(self, ids: np.ndarray, sample_id: str) -> None:
        # Named here, per sample (a skippable failure), rather than as a bucket overflow of the whole batch.
        if ids.shape[0] > self.config.max_tokens:
            raise ValueError(
                f"sample {sample_id}: {ids.shape[0]} tokens exceed max_tokens={self.config.max_tokens} "
                "(lower the fps / max_frames or the frame size)"
            )

    def _visual_of(self, video):
        _, _, processor = self._load()
        frames = np.asarray(video.frames)
        if frames.shape[1:3] != tuple(self.config.frame_size):
            raise ValueError(
                f"frames are {frames.shape[1]}x{frames.shape[2]}, the encoder expects "
                f"{self.config.frame_size[0]}x{self.config.frame_size[1]}: decode with read_video(size=frame_size)"
            )
        return processor.video(frames, fps=float(video.fps))
