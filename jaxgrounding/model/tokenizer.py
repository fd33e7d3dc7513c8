"""The checkpoint's tokenizer with MeCo's structural tokens, and the embedding rows they need.

MeCo (sec. 3.1) adds `<ent>` (an event) and `<tst>` (a transition) to the vocabulary. Their
embedding and LM-head rows start at the mean of the existing tokens' rows, so the new tokens
begin "average" rather than random (a common, stable choice for added tokens). Qwen2.5-VL's
embedding table is already larger than its tokenizer (151936 rows vs ~151665 tokens); the table
only grows when the new ids do not fit, and the rows of the new ids are initialised either way.

Tokenizers are only ever read from a local directory; nothing is fetched and no remote code runs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from transformers import AutoTokenizer

STRUCTURAL_TOKENS = ("<ent>", "<tst>")


@dataclasses.dataclass(frozen=True)
class GroundingTokenizer:
    tokenizer: object  # a transformers tokenizer
    ent_id: int
    tst_id: int
    base_vocab_size: int  # tokens before the structural ones were added

    def __len__(self) -> int:
        return len(self.tokenizer)


def load_tokenizer(path: str) -> GroundingTokenizer:
    """Loads the tokenizer saved in a checkpoint directory and adds `<ent>` / `<tst>`."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    base = len(tokenizer)
    tokenizer.add_tokens(list(STRUCTURAL_TOKENS), special_tokens=True)
    ent, tst = (tokenizer.convert_tokens_to_ids(t) for t in STRUCTURAL_TOKENS)
    return GroundingTokenizer(tokenizer=tokenizer, ent_id=int(ent), tst_id=int(tst), base_vocab_size=base)


def init_token_rows(model, token_ids, base_vocab_size: int) -> None:
    """Grows the embedding (and untied LM head) to fit `token_ids` and sets their rows to the mean
    of rows [0, base_vocab_size). Modifies `model` in place, including its config's vocab size."""
    decoder = model.decoder
    table = decoder.embed_tokens.get_value()
    vocab = table.shape[0]
    needed = max(max(token_ids) + 1, vocab)
    ids = jnp.asarray(token_ids)

    def fill(rows_first, axis):
        mean = jnp.mean(rows_first.take(jnp.arange(base_vocab_size), axis=axis), axis=axis, keepdims=True)
        if needed > vocab:
            pad_shape = list(rows_first.shape)
            pad_shape[axis] = needed - vocab
            rows_first = jnp.concatenate([rows_first, jnp.broadcast_to(mean, pad_shape)], axis=axis)
        index = (ids,) if axis == 0 else (slice(None), ids)
        return rows_first.at[index].set(jnp.broadcast_to(mean, rows_first[index].shape))

    decoder.embed_tokens.set_value(fill(table, 0))
    if decoder.lm_head is not None:
        decoder.lm_head.kernel.set_value(fill(decoder.lm_head.kernel.get_value(), 1))
    if needed > vocab:
        text = dataclasses.replace(model.config.text, vocab_size=needed)
        config = model.config.replace(text=text)
        model.config = config
        decoder.config = config
