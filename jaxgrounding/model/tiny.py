"""A tiny, randomly initialised Qwen2.5-VL checkpoint directory, for the default configs and tests.

No weights can be downloaded in every setting we support (CI, laptops, air-gapped clusters), so
the default runs start from a checkpoint directory this module writes in the HF layout a real
one has: `config.json` + `model.safetensors` + a tokenizer (a byte-level BPE trained on the
task's own texts, with Qwen's chat special tokens and a Qwen-style chat template) +
`preprocessor_config.json`. Everything downstream then takes exactly the code path a real
Qwen2.5-VL checkpoint takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable

from flax import nnx

from jaxgrounding.model import presets

# Qwen's chat format, trimmed to what grounding prompts use (one system turn, user turns with a
# video, assistant turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def write_tokenizer(path: str, texts: Iterable[str], vocab_size: int = 1024) -> None:
    """Trains a byte-level BPE on `texts` and saves it as an HF tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)


def build_tiny_checkpoint(path: str, texts: Iterable[str], *, seed: int = 0, max_pixels: int = 56 * 56, **sizes) -> str:
    """Writes a complete tiny checkpoint directory to `path`; reuses a finished one built with the same sizes, seed
    and pixel budget (recorded in its `tiny_build.json`) and replaces one built with others. The directory is
    built beside `path` and renamed into place, so `path` is never half-written. `sizes`: `presets.tiny`'s
    (hidden, layers, vision_depth, vision_hidden)."""
    from jaxgrounding.model.config import ModelConfig
    from jaxgrounding.model.video_llm import VideoLLM
    from jaxgrounding.model.weights import save_pretrained
    from transformers import AutoTokenizer

    build = {"seed": seed, "max_pixels": max_pixels, "sizes": sizes}
    record = os.path.join(path, "tiny_build.json")
    if os.path.isfile(record):
        with open(record) as f:
            if json.load(f) == json.loads(json.dumps(build)):
                return path
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        return path  # Finished before builds were recorded: kept, as its checkpoints were trained on it.
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    final, path = path, tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    write_tokenizer(path, texts)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Room for <ent>/<tst> and a multiple of 64 rows, as real checkpoints pad their tables.
    vocab = -(-(len(tokenizer) + 2) // 64) * 64
    hf = presets.tiny(ids, vocab, **sizes)
    model = VideoLLM(ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(seed))
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "min_pixels": 56 * 56,
                "max_pixels": max_pixels,
            },
            f,
            indent=2,
        )
    save_pretrained(model, path)
    with open(os.path.join(path, "tiny_build.json"), "w") as f:
        json.dump(build, f)
    if os.path.exists(final):
        shutil.rmtree(final)  # built with other sizes, or never finished
    os.rename(path, final)
    return final
