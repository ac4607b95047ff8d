"""The package's own tokenizer: characters, optionally with whole words and numbers."""

from __future__ import annotations

import pytest

from dasd_jax import char_tokenizer, config_defaults, hf, loading, validation
from dasd_jax.errors import UserError
from dasd_jax.tasks import synthetic


def pieces(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_the_default_tokenizer_has_one_token_per_character():
    tokenizer = char_tokenizer.build()
    assert pieces(tokenizer, "add 12.") == list("add 12.")


def test_synthetic_world_words_and_numbers_are_single_tokens_and_other_text_is_characters():
    tokenizer = char_tokenizer.build(words=synthetic.vocabulary_words(), numbers=True)
    assert pieces(tokenizer, "Adding 7 to 86 gives 93.") == [
        "Adding", " 7", " to", " 86", " gives", " 93", "."]
    # Unknown words, numbers over 999 and leading zeros are spelled out; decoding is exact.
    text = "adds 1234 007 x9 A:72"
    assert pieces(tokenizer, text) == ["a", "d", "d", "s", " ", "1", "2", "3", "4", " ", "0", "0",
                                       "7", " ", "x", "9", " ", "A", ":", "72"]
    for record in synthetic.pretraining_records(50, 0):
        ids = tokenizer(record["prompt"] + record["reference"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == record["prompt"] + record["reference"]


def test_a_word_tokenizer_saves_and_loads_back_through_hf_load_tokenizer(tmp_path):
    tokenizer = char_tokenizer.build(words=["start", "add"], numbers=True)
    tokenizer.save_pretrained(tmp_path)
    loaded = hf.load_tokenizer(str(tmp_path))
    text = "Q: start 75, add 2."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_words_must_be_letters():
    with pytest.raises(ValueError, match="'a b'"):
        char_tokenizer.build(words=["a b"])


def test_a_random_model_tokenizer_is_chosen_by_config_and_a_bad_choice_names_the_flag():
    config = config_defaults.base_config()
    assert len(loading.random_tokenizer(config)) == len(char_tokenizer.build())
    config.model.random_tokenizer = "synthetic"
    assert loading.random_tokenizer(config).convert_ids_to_tokens(
        loading.random_tokenizer(config)("start 12")["input_ids"]) == ["start", " 12"]
    config.model.random_tokenizer = "bpe"
    with pytest.raises(UserError, match=r"--config.model.random_tokenizer='bpe': choose from "
                                        r"characters, synthetic"):
        validation.validate(config)
