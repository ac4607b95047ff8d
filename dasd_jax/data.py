"""Records -> tokens -> batches: what the rewrite and train stages read.

    records = data.load_records(config.data.path, config.data.split, config.data.fields,
                                target=config.data.target)
    examples, stats = data.tokenize(records, tokenizer, config.data)
    batches = data.Batches(examples, batch_size, seed, config.data.buckets, pad_id)
    batch = next(batches)                      # dict of numpy arrays, all [B, T]
    saved = batches.state                      # {"epoch": 3, "index": 128}: resume from it

A record is a dict with canonical keys: `prompt`, `reference`, `response` (texts), and what a
rewrite recorded for each response token: `response_ids` and the trained signals of
`dasd_jax/signals.py` (`ref_logprob`, `base_logprob`, ..., one value per token; older files'
`ref_logprobs` / `base_logprobs` read as these); a rewrite's fallback lines have
`source = "reference"`. Each example is the prompt's tokens followed by the target's
(`data.target`: the rewrite `response` or the `reference`); only target tokens carry loss.

A batch is a dict of numpy arrays, all [B, T], where T is the smallest of `data.buckets` that
holds the batch's longest example (so the jitted step compiles once per bucket); its keys and
dtypes are `signals.BATCH_DTYPES`:

    tokens        int32    the sequence, padded with pad_id
    targets       int32    tokens shifted left by one: targets[:, t] = tokens[:, t + 1]; pad last
    loss_mask     bool     targets[:, t] is a target (response) token
    fallback      bool     ... of a record that fell back to its reference (source "reference")
    structural    bool     ... at or after the response's first stop token (end of turn / eos)
    (each trained signal)  its recorded value for targets[:, t]; the signal's fill (NaN) where
                           nothing was recorded

Every per-token value sits at the position that predicts its token, the position whose logits
score it, so masks, signals and log-probs line up without further shifting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dasd_jax import signals
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry

TEXT_FIELDS = ("prompt", "reference", "response")
CANONICAL_FIELDS = (*TEXT_FIELDS, "response_ids", *signals.TRAINED)
TARGETS = ("response", "reference")
OVERLONG = ("truncate", "drop")
PATH_FORMS = ("a JSONL file, a directory of *.jsonl files, a dataset directory written by "
              "datasets' save_to_disk, hf:NAME[:CONFIG], or synthetic (generated records)")


# ----------------------------------------------------------------------------- loading records


def load_records(path: str, split: str, fields: Mapping[str, str] | None, *,
                 target: str = "response", generated_examples: int = 0,
                 seed: int = 0, fields_flag: str = "--config.data.fields") -> list[dict]:
    """Records from `path`, with canonical keys (see the module docstring).

    `fields` maps each canonical name to the record's field name (`config.data.fields`); names it
    leaves out are read as themselves. `prompt` and the `target` field are required, the rest
    optional (absent keys are left out). Fields that no canonical name maps are kept unchanged
    (e.g. a task's `answer`, a rewrite's `source`). The rewrite stage passes
    target="reference"; training passes `config.data.target`. `fields_flag` is the config key
    that holds `fields`, named in errors.
    """
    path = str(path)
    names = {name: (fields.get(name) if fields is not None else None) or name
             for name in CANONICAL_FIELDS}
    if path in registry.record_sources():
        if target == "response":
            raise UserError(
                f"data.path={path} makes records with a prompt and a reference but no response: "
                "train on them with --config.data.target=reference, or rewrite them first")
        if generated_examples < 1:
            raise UserError(f"data.path={path} needs --config.data.generated_examples > 0")
        names = {name: name for name in CANONICAL_FIELDS}
        rows = ((f"{path} record {i}", row) for i, row in
                enumerate(registry.records(path, generated_examples, seed)))
    elif path.startswith("hf:"):
        rows = hub_rows(path, split)
    elif not path:
        raise UserError(f"no data path: set --config.data.path to {PATH_FORMS}")
    else:
        rows = local_rows(Path(path).expanduser(), split)
    required = ("prompt", target)
    records = [_canonical(row, where, names, required, fields_flag) for where, row in rows]
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def local_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    """(location, row) of a JSONL file, a directory of them, or a save_to_disk directory."""
    if not path.exists():
        raise UserError(f"no data at {path}: pass {PATH_FORMS}")
    if path.is_file():
        yield from jsonl_rows(path)
    elif any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
        yield from _saved_rows(path, split)
    else:
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"{path} has no *.jsonl files and is not a dataset directory written "
                            "by save_to_disk")
        for file in files:
            yield from jsonl_rows(file)


def jsonl_rows(file: Path) -> Iterator[tuple[str, dict]]:
    """(location, record) for each non-blank line of a JSONL file."""
    count = 0
    try:
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(
                        f"{file}, line {number}: not valid JSON ({error.msg}, column "
                        f"{error.colno}); each line must hold one JSON object") from None
                if not isinstance(row, dict):
                    raise UserError(f"{file}, line {number}: expected a JSON object, found a "
                                    f"{type(row).__name__}")
                count += 1
                yield f"{file}, line {number}", row
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; pass an uncompressed JSONL file") from None
    if count == 0:
        raise UserError(f"{file} is empty: it holds no records")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("reading hf: and save_to_disk data needs the `datasets` package: "
                        "pip install datasets (or pass a JSONL file)") from None
    return datasets


def _saved_rows(directory: Path, split: str) -> Iterator[tuple[str, dict]]:
    datasets = _import_datasets()
    try:
        data = datasets.load_from_disk(str(directory))
    except Exception as error:  # noqa: BLE001 - a damaged or foreign directory: one message
        raise UserError(f"{directory}: cannot load the dataset saved there "
                        f"({type(error).__name__}: {error})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{directory} has splits {', '.join(data)}, not {split!r}; choose one "
                            "with --config.data.split (or --config.data.eval_split)")
        data = data[split]
    for index, row in enumerate(data):
        yield f"{directory}, row {index}", row


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT) accepts a TCP connection; True in offline mode
    (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), where `datasets` reads its local cache instead.
    Without this check an unreachable hub costs ~25 s of `datasets` retries."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
           for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    address = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def hub_rows(spec: str, split: str) -> Iterator[tuple[str, dict]]:
    """(location, row) of `hf:NAME[:CONFIG]`'s `split`, via `datasets.load_dataset`."""
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise UserError(f"{spec}: expected hf:NAME or hf:NAME:CONFIG")
    if not hub_reachable():
        raise UserError(f"{spec}: the Hugging Face Hub does not answer from here; pass a local "
                        "copy of the data instead (a JSONL file or a save_to_disk directory; with "
                        "the dataset in the local cache, set HF_DATASETS_OFFLINE=1)")
    datasets = _import_datasets()
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown dataset or split: one message
        detail = str(error).splitlines()[0] if str(error) else ""
        raise UserError(
            f"{spec}: could not load dataset {name!r} (config {config or None!r}, split {split!r}) "
            f"from the Hugging Face Hub ({type(error).__name__}: {detail}). The hub is unreachable "
            "from here, or the dataset, config or split does not exist. Pass a local JSONL file or "
            "a save_to_disk directory via --config.data.path=PATH instead") from None
    for index, row in enumerate(data):
        yield f"{spec}, row {index}", row


def _canonical(row: dict, where: str, names: dict[str, str], required: Sequence[str],
               fields_flag: str) -> dict:
    """`row` with canonical keys; UserError naming the field, `where`, and the config key."""
    record = {}
    legacy = {name: key for key, name in signals.LEGACY_KEYS.items()}
    for name in CANONICAL_FIELDS:
        source = names[name]
        if source not in row and source == name and legacy.get(name) in row:
            source = legacy[name]  # a rewrite file from before the signals' names were one
        if source not in row:
            if name in required:
                hint = (" (or train on references with --config.data.target=reference)"
                        if name == "response" else "")
                raise UserError(
                    f"{where}: record has no field {source!r} for the {name} (its fields: "
                    f"{', '.join(map(str, row)) or 'none'}); if the {name} is under another name, "
                    f"map it with {fields_flag}.{name}=FIELD{hint}")
            continue
        value = row[source]
        try:
            if name in TEXT_FIELDS:
                if not isinstance(value, str) and (name == "prompt" or value is not None):
                    raise TypeError(f"expected a string, found {type(value).__name__}")
            elif value is not None and name == "response_ids":
                value = [int(token) for token in value]
            elif value is not None:
                value = [float("nan") if v is None else float(v) for v in value]
        except (TypeError, ValueError) as error:
            raise UserError(f"{where}: field {source!r} (the {name}): {error}") from None
        if value is not None:
            record[name] = value
    consumed = {names[name] for name in CANONICAL_FIELDS} | set(signals.LEGACY_KEYS)
    record.update({key: value for key, value in row.items()
                   if key not in consumed and key not in CANONICAL_FIELDS})
    return record


# ----------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized record; position t describes the prediction of tokens[t + 1].

    tokens: int32[L] (prompt then target); loss_mask: bool[L], True where tokens[t + 1] is a
    target token (the last entry is always False); fallback: bool[L], loss_mask of a record
    that fell back to its reference; structural: bool[L], True where tokens[t + 1] is a target
    token at or after the target's first stop token; signals: each trained signal's [L] array,
    the recorded value for tokens[t + 1] at t (its fill where none was recorded).
    record_index: the record's index in the list given to `tokenize`.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    fallback: np.ndarray
    structural: np.ndarray
    signals: dict[str, np.ndarray]
    record_index: int

    @property
    def prompt_length(self) -> int:
        return int(np.argmax(self.loss_mask)) + 1


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict], **options) -> str:
    """The chat template applied to `messages`, as text; UserError if the template fails."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as error:  # noqa: BLE001 - jinja errors, templates refusing a system message
        raise UserError(
            f"the chat template of tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} "
            f"failed ({type(error).__name__}: {error}); fix the template, or set "
            "--config.data.chat_template=False to use data.prompt_format") from None


def uses_chat_template(tokenizer, data_config) -> bool:
    """Whether prompts go through the tokenizer's chat template (else data.prompt_format)."""
    return bool(data_config.chat_template) and bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, data_config) -> list[dict]:
    system = [{"role": "system", "content": data_config.system_prompt}]
    return (system if data_config.system_prompt else []) + [{"role": "user", "content": prompt}]


def prompt_tokens(prompt: str, tokenizer, data_config) -> list[int]:
    """What a model reads before it answers `prompt`, as `tokenize` builds it: the chat template
    up to its generation prompt, or bos + data.prompt_format (the same ids as in training)."""
    if uses_chat_template(tokenizer, data_config):
        return _ids(tokenizer, _render(tokenizer, _messages(prompt, data_config),
                                       add_generation_prompt=True))
    bos = tokenizer.bos_token_id
    return ([] if bos is None else [bos]) + _ids(
        tokenizer, data_config.prompt_format.format(prompt=prompt))


def _response_tokens(record: dict, text: str, tokenizer, data_config) -> list[int]:
    """The record's response_ids; or with a chat template, the full conversation's text after
    the generation prompt (the target and the template's end-of-turn markers); or target + eos."""
    if "response_ids" in record:
        return [int(token) for token in record["response_ids"]]
    if not uses_chat_template(tokenizer, data_config):
        eos = tokenizer.eos_token_id
        return _ids(tokenizer, text) + ([] if eos is None else [eos])
    messages = _messages(record["prompt"], data_config)
    prompt_text = _render(tokenizer, messages, add_generation_prompt=True)
    full_text = _render(tokenizer, [*messages, {"role": "assistant", "content": text}])
    if not full_text.startswith(prompt_text):
        raise UserError(
            f"the chat template of tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} "
            "renders a conversation that does not start with its generation prompt "
            "(add_generation_prompt=True), so the response tokens cannot be told apart; fix the "
            "template, or set --config.data.chat_template=False to use data.prompt_format")
    return _ids(tokenizer, full_text[len(prompt_text):])


def response_tokens(prompt: str, text: str, tokenizer, data_config) -> list[int]:
    """The tokens training reads for `text` answering `prompt` (as `tokenize` builds them)."""
    return _response_tokens({"prompt": prompt}, text, tokenizer, data_config)


def _recorded_values(record: dict, name: str, response_length: int, index: int) -> np.ndarray:
    values = np.asarray(record.get(name, ()), np.float32).reshape(-1)
    if len(values) > response_length:
        raise UserError(
            f"record {index}: {name} has {len(values)} values but its response has "
            f"{response_length} tokens; record the values with this tokenizer, and store the "
            "response's token ids as response_ids so they align exactly")
    return values


def _example(index: int, prompt: list[int], response: list[int],
             values: dict[str, np.ndarray], fallback: bool, stop_ids: frozenset) -> Example:
    length, start = len(prompt) + len(response), len(prompt) - 1  # start predicts response[0]
    loss_mask = np.zeros(length, bool)
    loss_mask[start:length - 1] = True
    structural = np.zeros(length, bool)
    stops = [i for i, token in enumerate(response) if token in stop_ids]
    if stops:
        structural[start + stops[0]:length - 1] = True
    arrays = {}
    for name in signals.TRAINED:
        arrays[name] = signals.empty(name, length)
        recorded = values[name][:len(response)]
        arrays[name][start:start + len(recorded)] = recorded
    return Example(tokens=np.asarray(prompt + response, np.int32), loss_mask=loss_mask,
                   fallback=loss_mask & fallback, structural=structural, signals=arrays,
                   record_index=index)


def tokenize(records: Sequence[dict], tokenizer, data_config,
             stop_ids: Iterable[int] = ()) -> tuple[list[Example], dict]:
    """Examples for `records` under `data_config` (`config.data`), and counts of what happened.

    `stop_ids`: the model's end-of-sequence / end-of-turn ids (`sampling.stop_ids`); a target's
    tokens from its first stop token on are marked `structural`.

    Chat template (when `data_config.chat_template` and the tokenizer has one): optional system
    message + user(prompt) with the generation prompt, then the rest of the conversation with
    assistant(target), end-of-turn markers included. Otherwise bos + prompt_format(prompt), then
    target + eos. A record's `response_ids` replace the tokenized response verbatim, and its
    recorded values cover the first len(values) response tokens; a `reference` target ignores
    both (they describe the response). Over `max_seq_len`: `overlong="truncate"`
    cuts the response's end (dropping the example when the prompt leaves no room), "drop" drops
    it. Empty targets are skipped. One warning sums up truncated / dropped / empty records.
    Returns (examples, {"records", "examples", "truncated", "dropped", "empty"}).
    """
    target, overlong = data_config.target, data_config.overlong
    max_seq_len = int(data_config.max_seq_len)
    counts = {"truncated": 0, "dropped": 0, "empty": 0}
    examples, stops = [], frozenset(int(token) for token in stop_ids)
    for index, record in enumerate(records):
        if target == "reference":  # the ids and values a rewrite recorded are its response's
            record = {key: value for key, value in record.items()
                      if key != "response_ids" and key not in signals.TRAINED}
        text = record.get(target) or ""
        response = ([] if not ("response_ids" in record or text.strip()) else
                    _response_tokens(record, text, tokenizer, data_config))
        if not response:
            counts["empty"] += 1
            continue
        prompt = prompt_tokens(record["prompt"], tokenizer, data_config)
        if not prompt:
            raise UserError(f"record {index}: the prompt tokenizes to nothing, so no position "
                            "predicts the first response token; use a non-empty prompt_format")
        values = {name: _recorded_values(record, name, len(response), index)
                  for name in signals.TRAINED}
        if len(prompt) + len(response) > max_seq_len:
            room = max_seq_len - len(prompt)
            if overlong == "drop" or room < 1:
                counts["dropped"] += 1
                continue
            response = response[:room]
            counts["truncated"] += 1
        fallback = target == "response" and record.get("source") == "reference"
        examples.append(_example(index, prompt, response, values, fallback, stops))
    summary = ", ".join(f"{count} {what}" for what, count in (
        (f"truncated to max_seq_len={max_seq_len}", counts["truncated"]),
        (f"dropped as longer than max_seq_len={max_seq_len}", counts["dropped"]),
        (f"skipped for an empty {target}", counts["empty"]),
    ) if count)
    if not examples:
        raise UserError(f"no examples left from {len(records)} records ({summary}); raise "
                        "--config.data.max_seq_len or check --config.data.target")
    if summary:
        warnings.warn(f"tokenize: {len(examples)} of {len(records)} records kept; {summary}",
                      stacklevel=2)
    return examples, {"records": len(records), "examples": len(examples), **counts}


def has_values(examples: Iterable[Example], *names: str) -> bool:
    """Whether every target token of every example has a recorded value of each signal."""
    return all(_covers(example, name) for example in examples for name in names)


def _covers(example: Example, name: str) -> bool:
    return not np.isnan(example.signals[name][example.loss_mask]).any()


def check_cached_base_signals(examples: Sequence[Example]) -> None:
    """UserError unless every target token has the base signals (`signals.BASE`, what
    `train.base_confidence="cached"` reads instead of running the base model)."""
    lacking = sum(not all(_covers(e, name) for name in signals.BASE) for e in examples)
    if lacking:
        raise UserError(
            f"{lacking} of {len(examples)} examples lack {' / '.join(signals.BASE)} on their "
            "response tokens, which --config.train.base_confidence=cached reads instead of "
            "running the base model. Rewrite the data in dasd (co-decoding) mode, which records "
            "them, or set --config.train.base_confidence=model")


# ----------------------------------------------------------------------------- batching


def smallest_bucket(length: int, buckets: Sequence[int], fix: str) -> int:
    """The smallest bucket >= length; UserError saying `fix` when none is long enough."""
    fitting = [bucket for bucket in buckets if bucket >= length]
    if not fitting:
        raise UserError(f"a sequence of {length} tokens is longer than the largest length bucket "
                        f"{max(buckets, default=0)}; {fix}")
    return min(fitting)


def _bucket(length: int, buckets: Sequence[int]) -> int:
    return smallest_bucket(length, buckets, "--config.data.buckets must include data.max_seq_len")


def collate(examples: Sequence[Example], buckets: Sequence[int], pad_id: int) -> dict:
    """Examples padded to T = the smallest bucket >= the longest: a dict of [B, T] arrays
    (keys and dtypes in the module docstring)."""
    shape = (len(examples), _bucket(max(len(example.tokens) for example in examples), buckets))
    batch = {"tokens": np.full(shape, pad_id, np.int32)}
    batch.update({key: np.zeros(shape, bool) for key in signals.MASKS})
    batch.update({name: signals.empty(name, shape) for name in signals.TRAINED})
    for row, example in enumerate(examples):
        length = len(example.tokens)
        for key in ("tokens", *signals.MASKS):
            batch[key][row, :length] = getattr(example, key)
        for name in signals.TRAINED:
            batch[name][row, :length] = example.signals[name]
    batch["targets"] = np.full(shape, pad_id, np.int32)
    batch["targets"][:, :-1] = batch["tokens"][:, 1:]
    return batch


class Batches:
    """Deterministic, resumable batches over `examples`, forever.

    Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`,
    `batch_size` at a time; an epoch's incomplete tail is dropped. `buckets` are the padded
    lengths (see `collate`); they must include max_seq_len, so that every example fits.
    `pad_id` None pads with 0 (padding never carries loss). `.state` ({"epoch", "index"}, JSON
    serialisable) is where the next batch starts; `Batches(..., state=saved)` continues exactly.

    `group_by_length=k > 1` cuts padding: each window of k batches of the epoch's permutation is
    sorted by length and cut into batches, which are then visited in a random order, so a batch
    holds examples of similar length (and is padded to a smaller bucket) while the windows keep
    the epoch's order random. k = 1 (default) keeps the plain permutation.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int,
                 buckets: Sequence[int], pad_id: int | None, state: dict | None = None,
                 group_by_length: int = 1):
        self.examples = list(examples)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.group_by_length = int(group_by_length)
        if self.group_by_length < 1:
            raise UserError(f"group_by_length {group_by_length}: must be at least 1 (1 = off)")
        self.buckets = tuple(sorted(int(bucket) for bucket in buckets))
        self.pad_id = 0 if pad_id is None else int(pad_id)
        if self.batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1")
        if len(self.examples) < self.batch_size:
            raise UserError(f"{len(self.examples)} examples are fewer than the batch size "
                            f"{self.batch_size}; lower --config.train.batch_size or add data")
        _bucket(max(len(example.tokens) for example in self.examples), self.buckets)
        state = state or {"epoch": 0, "index": 0}
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        if self._epoch < 0 or self._index < 0:
            raise UserError(f"data state {state}: epoch and index must be non-negative")
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples))
            if self.group_by_length > 1:
                order = self._grouped(order, rng)
            self._order = (epoch, order)
        return self._order[1]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`order` with each window of `group_by_length` batches sorted by length and its batches
        shuffled; the incomplete tail (dropped anyway) stays as it is."""
        size, window = self.batch_size, self.batch_size * self.group_by_length
        usable = len(order) // size * size
        grouped = []
        for start in range(0, usable, window):
            chunk = order[start:min(start + window, usable)]
            lengths = np.array([len(self.examples[i].tokens) for i in chunk])
            chunk = chunk[np.argsort(lengths, kind="stable")].reshape(-1, size)
            grouped.append(chunk[rng.permutation(len(chunk))].reshape(-1))
        return np.concatenate(grouped + [order[usable:]])

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._index + self.batch_size > len(self.examples):
            self._epoch, self._index = self._epoch + 1, 0
        indices = self._permutation(self._epoch)[self._index:self._index + self.batch_size]
        self._index += self.batch_size
        return collate([self.examples[i] for i in indices], self.buckets, self.pad_id)

    next = __next__
