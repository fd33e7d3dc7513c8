"""The pipeline transform of streamed (TimeScope) training: each structural example cut into prefix / segments /
suffix (`memory.layout.split_example`) with its coarse-to-fine reload draw, so the trainer receives arrays only.

The draw is TimeScope's second SFT stage (`tasks.coarse_to_fine.training_reloads`), made per sample and epoch
(`coarse_to_fine.sample_rng`): the data iterator's checkpointed state holds the stream position, so a resumed run
draws the same, on any number of processes or workers. The keys are `data.schema.STREAMED`.
"""

from __future__ import annotations

import numpy as np

from jaxgrounding.memory.layout import StreamingConfig, split_example
from jaxgrounding.tasks import coarse_to_fine
from jaxgrounding.tasks.encoding import StructuralEncoder

# What the streamed loss reads of the structural example besides its cut (the targets), and what reports name.
_KEPT = ("struct_kinds", "struct_ranges", "windows", "duration", "id")


class StreamedEncoder:
    """Picklable (grain workers): the structural encoder, the streaming geometry and the augmentation's settings."""

    def __init__(
        self,
        encoder: StructuralEncoder,
        streaming: StreamingConfig,
        reloads: coarse_to_fine.CoarseToFineConfig,
        seed: int,
    ):
        self.encoder = encoder
        self.streaming = streaming
        self.reloads = reloads
        self.seed = seed
        self._prefix = None  # the chat template's tokens before the video, tokenized once per process

    def __call__(self, sample, video, epoch: int) -> dict[str, np.ndarray]:
        example = self.encoder(sample, video, epoch)
        cut = split_example(example, self.encoder.model_config, self.streaming, self.encoder.config.frame_size)
        # One buffer layout serves a batch only if every row has the same prefix: the chat template's.
        if self._prefix is None:
            self._prefix = self.encoder.video_prefix()
        if not np.array_equal(cut["prefix_ids"], self._prefix):
            raise ValueError(
                f"sample {sample.id}: the tokens before the video differ from the chat template's prefix; streamed "
                "batches need the same prefix in every row"
            )
        rng = coarse_to_fine.sample_rng(self.seed, epoch, sample.id)
        reloaded = coarse_to_fine.training_reloads(example, self.streaming.segment_frames, self.reloads, rng)
        return cut | {key: example[key] for key in _KEPT} | {"reloaded": reloaded}
