"""Records load from every supported source, tokenize with response-only loss masks, and batch
deterministically and resumably."""

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from dasd_jax import char_tokenizer, config_defaults, data, signals
from dasd_jax.errors import UserError
from dasd_jax.tasks import synthetic

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH_KEYS = signals.BATCH_DTYPES


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer.build()


def data_config(**changes):
    config = config_defaults.base_config().data
    config.update(changes)
    return config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def masked_targets(example):
    """The tokens that carry loss: tokens[t + 1] wherever loss_mask[t]."""
    return example.tokens[1:][example.loss_mask[:-1]]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_examples(lengths):
    """Examples whose first token is their index + 10, so batches show which examples they hold."""
    examples = []
    for index, length in enumerate(lengths):
        tokens = np.full(length, 3, np.int32)
        tokens[0] = index + 10
        mask = np.zeros(length, bool)
        mask[:-1] = True
        no = np.zeros(length, bool)
        examples.append(data.Example(
            tokens, mask, fallback=no, structural=no, record_index=index,
            signals={name: signals.empty(name, length) for name in signals.TRAINED}))
    return examples


# ----------------------------------------------------------------------------- tokenizing


def test_chat_template_loss_mask_covers_exactly_the_response_and_its_end_of_turn(tokenizer):
    records = [{"prompt": "2+3?", "response": "It is 5."}]
    (example,), stats = data.tokenize(records, tokenizer, data_config(system_prompt="Be brief."))
    assert tokenizer.decode(example.tokens) == (
        "<|system|>Be brief.</s><|user|>2+3?</s><|assistant|>It is 5.</s>")
    assert tokenizer.decode(masked_targets(example)) == "It is 5.</s>"
    assert not example.loss_mask[-1]
    assert example.tokens.dtype == np.int32 and example.loss_mask.dtype == bool
    assert stats == {"records": 1, "examples": 1, "truncated": 0, "dropped": 0, "empty": 0}


def test_prompt_format_path_puts_bos_before_the_prompt_and_trains_the_response_and_eos(tokenizer):
    records = [{"prompt": "2+3?", "response": "5"}]
    (example,), _ = data.tokenize(records, tokenizer, data_config(chat_template=False))
    assert example.tokens[0] == tokenizer.bos_token_id
    assert tokenizer.decode(example.tokens) == "<s>Question: 2+3?\nAnswer: 5</s>"
    assert masked_targets(example).tolist() == ids(tokenizer, "5") + [tokenizer.eos_token_id]


def test_a_tokenizer_without_a_chat_template_falls_back_to_prompt_format():
    plain = char_tokenizer.build()
    plain.chat_template = None
    (example,), _ = data.tokenize([{"prompt": "hi", "response": "ok"}], plain, data_config())
    assert plain.decode(example.tokens) == "<s>Question: hi\nAnswer: ok</s>"


def test_a_chat_template_whose_conversation_does_not_extend_its_generation_prompt_is_refused():
    broken = char_tokenizer.build()
    generation_prompt = "{% if add_generation_prompt %}<|assistant|>"
    broken.chat_template = broken.chat_template.replace(generation_prompt,
                                                        generation_prompt + "\n")
    with pytest.raises(UserError, match=r"does not start with its generation prompt.*"
                                        r"--config.data.chat_template=False"):
        data.tokenize([{"prompt": "hi", "response": "ok"}], broken, data_config())


def test_response_ids_replace_the_tokenized_response_verbatim(tokenizer):
    records = [{"prompt": "hi", "response": "text that is not used", "response_ids": [40, 41, 42]}]
    (example,), _ = data.tokenize(records, tokenizer, data_config())
    assert example.tokens[-3:].tolist() == [40, 41, 42]
    assert masked_targets(example).tolist() == [40, 41, 42]


def test_recorded_logprobs_sit_at_the_position_that_predicts_their_token(tokenizer):
    records = [{"prompt": "hi", "response": "ab", "ref_logprob": [-0.1, -0.2]}]
    (example,), _ = data.tokenize(records, tokenizer, data_config())
    start = example.prompt_length - 1  # predicts the first response token
    assert example.tokens[start + 1] == ids(tokenizer, "a")[0]
    np.testing.assert_allclose(example.signals["ref_logprob"][start:start + 2], [-0.1, -0.2])
    rest = np.delete(example.signals["ref_logprob"], [start, start + 1])
    assert np.isnan(rest).all() and np.isnan(example.signals["base_logprob"]).all()
    assert example.signals["ref_logprob"].dtype == np.float32
    assert not data.has_values([example], "ref_logprob")  # "</s>" has no recorded value


def test_the_veto_signals_sit_with_the_others_and_fallback_lines_are_marked(tokenizer):
    records = [{"prompt": "hi", "response": "ab", "response_ids": [40, 41], "source": "reference",
                "reference": "ab", "ref_logprob_base_choice": [-2.0, -0.5],
                "ref_top1": [-0.1, -0.2]},
               {"prompt": "hi", "response": "ab", "response_ids": [40, 41], "source": "rewrite"}]
    (fallback, rewritten), _ = data.tokenize(records, tokenizer, data_config())
    start = fallback.prompt_length - 1
    np.testing.assert_allclose(fallback.signals["ref_logprob_base_choice"][start:start + 2],
                               [-2.0, -0.5])
    np.testing.assert_allclose(fallback.signals["ref_top1"][start:start + 2], [-0.1, -0.2])
    assert fallback.fallback.tolist() == fallback.loss_mask.tolist()
    assert not rewritten.fallback.any() and np.isnan(rewritten.signals["ref_top1"]).all()
    (as_reference,), _ = data.tokenize(records[:1], tokenizer, data_config(target="reference"))
    assert not as_reference.fallback.any()  # training on references: no line is a fallback


def test_the_response_from_its_first_stop_token_on_is_structural(tokenizer):
    eos = tokenizer.eos_token_id
    records = [{"prompt": "hi", "response": "ab"},  # tokenized as "ab" + eos
               {"prompt": "hi", "response": "ab", "response_ids": [40, eos, 10]},
               {"prompt": "hi", "response": "ab", "response_ids": [40, 41]}]  # unfinished
    examples, _ = data.tokenize(records, tokenizer, data_config(), stop_ids=[eos])
    structural = [masked_targets_of(e, e.structural) for e in examples]
    assert structural == [[eos], [eos, 10], []]
    assert not data.tokenize(records, tokenizer, data_config())[0][0].structural.any()


def masked_targets_of(example, mask):
    return example.tokens[1:][mask[:-1]].tolist()


def test_more_recorded_values_than_response_tokens_is_an_error_naming_both_lengths(tokenizer):
    records = [{"prompt": "hi", "response": "ab", "response_ids": [40, 41],
                "ref_logprob": [-0.1, -0.2, -0.3]}]
    with pytest.raises(UserError, match=r"record 0: ref_logprob has 3 values but its response "
                                        r"has 2 tokens"):
        data.tokenize(records, tokenizer, data_config())


def test_cached_base_signals_must_cover_every_response_token(tokenizer):
    complete = {"prompt": "hi", "response": "ab", "response_ids": [40, 41],
                "base_logprob": [-0.5, -0.6], "base_top1": [0.9, 0.8]}
    partial = {**complete, "base_top1": [0.9]}
    examples, _ = data.tokenize([complete, partial], tokenizer, data_config())
    data.check_cached_base_signals(examples[:1])
    with pytest.raises(UserError, match=r"1 of 2 examples lack base_logprob / base_top1.*"
                                        r"--config.train.base_confidence=model"):
        data.check_cached_base_signals(examples)


def test_overlong_truncate_cuts_the_response_end_and_warns_once_with_counts(tokenizer):
    records = [{"prompt": "hi", "response": "x" * n} for n in (2, 30, 40)]
    records.append({"prompt": "y" * 30, "response": "z"})  # the prompt alone leaves no room
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, stats = data.tokenize(records, tokenizer, data_config(max_seq_len=16))
    assert len(caught) == 1
    assert "2 truncated to max_seq_len=16" in str(caught[0].message)
    assert stats == {"records": 4, "examples": 3, "truncated": 2, "dropped": 1, "empty": 0}
    assert [len(e.tokens) for e in examples] == [len(examples[0].tokens), 16, 16]
    assert tokenizer.decode(masked_targets(examples[1])).startswith("xxx")  # the end was cut


def test_overlong_drop_drops_the_example_and_counts_it(tokenizer):
    records = [{"prompt": "hi", "response": "x" * n} for n in (2, 30, 40)]
    with pytest.warns(UserWarning, match=r"2 dropped as longer than max_seq_len=16"):
        examples, stats = data.tokenize(records, tokenizer,
                                        data_config(max_seq_len=16, overlong="drop"))
    assert [e.record_index for e in examples] == [0]
    assert stats["dropped"] == 2 and stats["truncated"] == 0


def test_empty_responses_are_skipped_and_counted(tokenizer):
    records = [{"prompt": "a", "response": "ok"}, {"prompt": "b", "response": ""},
               {"prompt": "c", "response": "  "}, {"prompt": "d"}]
    with pytest.warns(UserWarning, match=r"3 skipped for an empty response"):
        examples, stats = data.tokenize(records, tokenizer, data_config())
    assert [e.record_index for e in examples] == [0] and stats["empty"] == 3


def test_reference_target_trains_the_reference_text(tokenizer):
    records = [{"prompt": "q", "reference": "ref", "response": "resp"}]
    (example,), _ = data.tokenize(records, tokenizer, data_config(target="reference"))
    assert tokenizer.decode(masked_targets(example)) == "ref</s>"


def test_reference_target_ignores_the_ids_and_values_a_rewrite_recorded(tokenizer):
    """A rewrite file trained as SFT (data.target=reference) trains its references, not the
    rewrites its response_ids spell, and no recorded response signal leaks onto them."""
    response_ids = tokenizer("resp")["input_ids"] + [tokenizer.eos_token_id]
    records = [{"prompt": "q", "reference": "ref", "response": "resp",
                "response_ids": response_ids, "ref_logprob": [-0.5] * len(response_ids),
                "base_logprob": [-2.0] * len(response_ids)}]
    (example,), _ = data.tokenize(records, tokenizer, data_config(target="reference"))
    assert tokenizer.decode(masked_targets(example)) == "ref</s>"
    assert all(np.isnan(example.signals[name]).all() for name in ("ref_logprob", "base_logprob"))
    (example,), _ = data.tokenize(records, tokenizer, data_config(target="response"))
    assert list(masked_targets(example)) == response_ids


# ----------------------------------------------------------------------------- loading


def test_jsonl_records_load_with_canonical_keys_and_keep_other_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "response": "r", "ref_logprob": [-1, None], "source": "rewrite"}])
    assert data.load_records(str(path), "train", config_defaults.base_config().data.fields) == [
        {"prompt": "p", "response": "r", "ref_logprob": [-1.0, pytest.approx(np.nan, nan_ok=True)],
         "source": "rewrite"}]


def test_rewrite_files_from_before_the_signals_had_one_name_still_load(tmp_path):
    path = write_jsonl(tmp_path / "old.jsonl", [
        {"prompt": "p", "response": "r", "ref_logprobs": [-1.0], "base_logprobs": [-2.0],
         "base_top1": [0.5]}])
    (record,) = data.load_records(str(path), "train", config_defaults.base_config().data.fields)
    assert record == {"prompt": "p", "response": "r", "ref_logprob": [-1.0],
                      "base_logprob": [-2.0], "base_top1": [0.5]}


def test_field_mapping_reads_renamed_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a.", "id": 7}])
    fields = config_defaults.base_config().data.fields
    fields.update(prompt="question", reference="answer")
    records = data.load_records(str(path), "train", fields, target="reference")
    assert records == [{"prompt": "q?", "reference": "a.", "id": 7}]


def test_malformed_jsonl_line_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": oops}\n')
    with pytest.raises(UserError, match=rf"{path}, line 3: not valid JSON"):
        data.load_records(str(path), "train", None)


def test_missing_field_error_names_the_field_the_line_and_the_config_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": "r"}])
    with pytest.raises(UserError, match=rf"{path}, line 1: record has no field 'prompt'.*"
                                        r"--config.data.fields.prompt=FIELD"):
        data.load_records(str(path), "train", None)


def test_a_missing_response_suggests_training_on_references(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "reference": "r"}])
    with pytest.raises(UserError, match=r"no field 'response'.*--config.data.target=reference"):
        data.load_records(str(path), "train", None)


def test_missing_path_empty_file_and_empty_directory_are_errors_naming_the_path(tmp_path):
    with pytest.raises(UserError, match=rf"no data at {tmp_path / 'nope.jsonl'}"):
        data.load_records(str(tmp_path / "nope.jsonl"), "train", None)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=rf"{tmp_path / 'empty.jsonl'} is empty"):
        data.load_records(str(tmp_path / "empty.jsonl"), "train", None)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=rf"{tmp_path / 'dir'} has no \*.jsonl files"):
        data.load_records(str(tmp_path / "dir"), "train", None)


def test_a_directory_of_jsonl_files_loads_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2", "response": "r"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "0", "response": "r"},
                                       {"prompt": "1", "response": "r"}])
    records = data.load_records(str(tmp_path), "train", None)
    assert [r["prompt"] for r in records] == ["0", "1", "2"]


def test_a_dataset_saved_with_save_to_disk_loads_and_a_dataset_dict_gives_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "q1", "response": "r1"}, {"question": "q2", "response": "r2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(
        str(tmp_path / "dict"))
    fields = {"prompt": "question"}
    assert [r["prompt"] for r in data.load_records(str(tmp_path / "single"), "x", fields)] == [
        "q1", "q2"]
    assert data.load_records(str(tmp_path / "dict"), "test", fields) == [
        {"prompt": "q2", "response": "r2"}]
    with pytest.raises(UserError, match=r"has splits train, test, not 'validation'"):
        data.load_records(str(tmp_path / "dict"), "validation", fields)


def test_hub_dataset_offline_fails_fast_saying_to_pass_a_local_file():
    pytest.importorskip("datasets")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"hf:openai/gsm8k:main: could not load dataset "
                                        r"'openai/gsm8k'.*hub is unreachable.*"
                                        r"--config.data.path=PATH"):
        data.load_records("hf:openai/gsm8k:main", "train", None, target="reference")
    assert time.monotonic() - started < 30


def test_generated_records_are_deterministic_worked_arithmetic_problems():
    records = synthetic.generate_records(50, seed=1)
    assert records == synthetic.generate_records(50, seed=1)
    assert records != synthetic.generate_records(50, seed=2)
    for record in records:
        assert record["prompt"].startswith("Start with ")
        assert record["prompt"].endswith(". What is the result?")
        assert record["reference"].endswith(f"The answer is {record['answer']}.")
        steps = record["reference"].count(" = ")
        assert 1 <= steps <= 4
        for line in record["reference"].split(". ")[1:-1]:  # "7 + 5 = 12"
            left, operator, right, _, result = line.split()
            left, right, result = int(left), int(right), int(result)
            assert {"+": left + right, "-": left - right, "*": left * right}[operator] == result
            assert result >= 0


def test_the_synthetic_path_loads_generated_records_as_references(tokenizer):
    records = data.load_records("synthetic", "train", None, target="reference",
                                generated_examples=5, seed=3)
    assert records == synthetic.generate_records(5, seed=3)
    examples, _ = data.tokenize(records, tokenizer, data_config(target="reference"))
    assert len(examples) == 5
    with pytest.raises(UserError, match=r"--config.data.target=reference"):
        data.load_records("synthetic", "train", None, generated_examples=5)


def test_shared_gsm8k_loads_with_a_field_mapping_and_tokenizes(tokenizer):
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    records = data.load_records(str(path), "train", {"prompt": "question", "reference": "answer"},
                                target="reference")
    assert len(records) > 1000 and set(records[0]) == {"prompt", "reference"}
    examples, stats = data.tokenize(records[:200], tokenizer,
                                    data_config(target="reference", max_seq_len=2048))
    assert stats == {"records": 200, "examples": 200, "truncated": 0, "dropped": 0, "empty": 0}
    assert tokenizer.decode(masked_targets(examples[0])).endswith("#### 72</s>")


# ----------------------------------------------------------------------------- batching


def first_tokens(batch):
    return (batch["tokens"][:, 0] - 10).tolist()


def test_batches_are_deterministic_and_padded_to_the_smallest_fitting_bucket():
    examples = make_examples([3, 5, 7, 9, 11, 13, 15, 17, 19, 20])
    one = data.Batches(examples, 2, seed=0, buckets=(32, 8, 16), pad_id=0)
    two = data.Batches(examples, 2, seed=0, buckets=(8, 16, 32), pad_id=0)
    for _ in range(7):
        batch, again = next(one), two.next()
        assert set(batch) == set(BATCH_KEYS)
        for key, dtype in BATCH_KEYS.items():
            np.testing.assert_array_equal(batch[key], again[key])
            assert batch[key].dtype == dtype and batch[key].shape == batch["tokens"].shape
        longest = max(len(examples[i].tokens) for i in first_tokens(batch))
        assert batch["tokens"].shape[1] == min(b for b in (8, 16, 32) if b >= longest)


def test_a_batch_holds_shifted_targets_and_padding_that_carries_no_loss():
    examples = make_examples([3, 6])
    batch = next(data.Batches(examples, 2, seed=0, buckets=(8,), pad_id=0))
    row = first_tokens(batch).index(0)  # the 3-token example
    assert batch["tokens"][row].tolist() == [10, 3, 3, 0, 0, 0, 0, 0]
    assert batch["targets"][row].tolist() == [3, 3, 0, 0, 0, 0, 0, 0]
    assert batch["loss_mask"][row].tolist() == [True, True] + [False] * 6
    assert np.isnan(batch["ref_logprob"]).all()


def test_batches_drop_an_epochs_tail_and_roll_over_to_the_next_epoch():
    examples = make_examples([4] * 10)
    batches = data.Batches(examples, 4, seed=5, buckets=(8,), pad_id=0)
    epoch0 = np.random.default_rng([5, 0]).permutation(10).tolist()
    epoch1 = np.random.default_rng([5, 1]).permutation(10).tolist()
    assert first_tokens(next(batches)) == epoch0[:4]
    assert first_tokens(next(batches)) == epoch0[4:8]
    assert batches.state == {"epoch": 0, "index": 8}
    assert first_tokens(next(batches)) == epoch1[:4]
    assert batches.state == {"epoch": 1, "index": 4}


def test_batches_resumed_from_state_reproduce_the_same_subsequent_batches():
    examples = make_examples(list(range(3, 17)))
    batches = data.Batches(examples, 4, seed=1, buckets=(8, 16), pad_id=0)
    for _ in range(5):
        next(batches)
    saved = json.loads(json.dumps(batches.state))
    expected = [next(batches) for _ in range(6)]
    resumed = data.Batches(examples, 4, seed=1, buckets=(8, 16), pad_id=0, state=saved)
    for batch in expected:
        again = next(resumed)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], again[key])


def test_batches_refuse_too_few_examples_and_examples_longer_than_the_largest_bucket():
    with pytest.raises(UserError, match=r"3 examples are fewer than the batch size 4"):
        data.Batches(make_examples([4] * 3), 4, seed=0, buckets=(8,), pad_id=0)
    with pytest.raises(UserError, match=r"a sequence of 9 tokens is longer than the largest length "
                                        r"bucket 8; --config.data.buckets must include"):
        data.Batches(make_examples([4, 9]), 1, seed=0, buckets=(8,), pad_id=0)


def test_length_grouping_visits_each_example_once_per_epoch_in_batches_of_similar_length():
    lengths = [4, 30] * 16  # alternating short and long: unsorted batches mix them
    # One window of 8 batches holds the whole epoch: 4 batches of short, 4 of long examples.
    plain = data.Batches(make_examples(lengths), 4, seed=2, buckets=(8, 32), pad_id=0)
    grouped = data.Batches(make_examples(lengths), 4, seed=2, buckets=(8, 32), pad_id=0,
                           group_by_length=8)
    plain_width = sum(next(plain)["tokens"].shape[1] for _ in range(8))
    epoch = [next(grouped) for _ in range(8)]
    assert sorted(i for batch in epoch for i in first_tokens(batch)) == list(range(32))
    assert sum(batch["tokens"].shape[1] for batch in epoch) == 4 * 8 + 4 * 32 < plain_width
    assert data.Batches(make_examples(lengths), 4, seed=2, buckets=(8, 32), pad_id=0,
                        group_by_length=8, state=grouped.state).state == grouped.state
    resumed = data.Batches(make_examples(lengths), 4, seed=2, buckets=(8, 32), pad_id=0,
                           group_by_length=8, state={"epoch": 0, "index": 12})
    np.testing.assert_array_equal(next(resumed)["tokens"], epoch[3]["tokens"])
    with pytest.raises(UserError, match="group_by_length 0: must be at least 1"):
        data.Batches(make_examples(lengths), 4, seed=2, buckets=(8, 32), pad_id=0,
                     group_by_length=0)
