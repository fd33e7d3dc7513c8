"""<ent>/<tst> added to a checkpoint's tokenizer; their embedding rows start at the mean row."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import jaxgrounding.model as jm
from jaxgrounding.model.tokenizer import init_token_rows, load_tokenizer
from tests.model import hf_reference as ref


def write_tiny_tokenizer(path, vocab_size=280):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["when does the red circle move left", "a person opens the door"] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(
        path
    )


@pytest.fixture()
def checkpoint(tmp_path):
    ref.build_reference("qwen2_5_vl", str(tmp_path))
    write_tiny_tokenizer(str(tmp_path))
    return str(tmp_path)


def test_structural_tokens_are_single_special_tokens(checkpoint):
    tok = load_tokenizer(checkpoint)
    assert tok.ent_id == tok.base_vocab_size and tok.tst_id == tok.base_vocab_size + 1
    ids = tok.tokenizer("the door<ent>\n<tst>", add_special_tokens=False)["input_ids"]
    assert tok.ent_id in ids and tok.tst_id in ids
    assert tok.tokenizer.decode([tok.ent_id, tok.tst_id]) == "<ent><tst>"


def test_rows_initialised_to_mean_inside_existing_table(checkpoint):
    tok = load_tokenizer(checkpoint)
    model = jm.from_pretrained(checkpoint)
    table = np.asarray(model.decoder.embed_tokens.get_value())
    head = np.asarray(model.decoder.lm_head.kernel.get_value())
    init_token_rows(model, [tok.ent_id, tok.tst_id], tok.base_vocab_size)
    new_table = np.asarray(model.decoder.embed_tokens.get_value())
    assert new_table.shape == table.shape  # 282 tokens fit in the 300-row table
    mean = table[: tok.base_vocab_size].mean(0)
    np.testing.assert_allclose(new_table[tok.ent_id], mean, atol=1e-7)
    np.testing.assert_allclose(new_table[tok.tst_id], mean, atol=1e-7)
    np.testing.assert_array_equal(new_table[: tok.base_vocab_size], table[: tok.base_vocab_size])
    np.testing.assert_allclose(
        np.asarray(model.decoder.lm_head.kernel.get_value())[:, tok.ent_id],
        head[:, : tok.base_vocab_size].mean(1),
        atol=1e-7,
    )


def test_table_grows_when_ids_do_not_fit(checkpoint):
    model = jm.from_pretrained(checkpoint)
    table = np.asarray(model.decoder.embed_tokens.get_value())
    init_token_rows(model, [300, 301], base_vocab_size=290)
    assert model.config.text.vocab_size == 302
    new_table = np.asarray(model.decoder.embed_tokens.get_value())
    np.testing.assert_allclose(new_table[300], table[:290].mean(0), atol=1e-7)
    out = model(input_ids=np.array([[5, 300, 301]]))
    assert out.logits.shape == (1, 3, 302)
    # the grown model exports and loads back with the new vocabulary
    path = checkpoint + "_grown"
    jm.save_pretrained(model, path)
    assert jm.from_pretrained(path).config.text.vocab_size == 302


def test_tokenizer_is_only_read_locally(tmp_path):
    with pytest.raises(OSError):
        load_tokenizer(str(tmp_path / "not-a-checkpoint"))
