"""lm-evaluation-harness adapter: any lm-eval task on a dasd_jax model (optional; needs lm-eval).

    python -m dasd_jax.lm_eval_adapter --model dasd_jax \
        --model_args path=/ckpt/dir,dtype=bfloat16,batch_size=16 --tasks gsm8k

lm-eval 0.4.x finds models only in its own registry: it reads no plugin entry points, and
`--include_path` adds task YAMLs, not models. The model named "dasd_jax" is registered when this
module is imported, so the command above imports it and then hands its arguments unchanged to
lm-eval's own command line (`lm_eval.__main__.cli_evaluate`): every lm-eval flag works
(`--num_fewshot`, `--limit`, `--apply_chat_template`, `--output_path`, `--log_samples`, ...).
The plain `lm_eval` command cannot see the model. From Python:

    import lm_eval
    import dasd_jax.lm_eval_adapter  # noqa: F401  (registers "dasd_jax")
    results = lm_eval.simple_evaluate(model="dasd_jax", tasks=["gsm8k"],
                                      model_args="path=/ckpt/dir,dtype=bfloat16,batch_size=16")

Model args (`--model_args key=value,...`; they win over lm-eval's `--batch_size`, whose default
of 1 lm-eval always passes):

    path            HF checkpoint directory or hub id (`pretrained` is accepted as a synonym)
    dtype           param and compute dtype: auto (the checkpoint's own), bfloat16, float32, ...
    batch_size      rows per compiled call (default 16); every batch is padded to it
    max_length      context window in tokens (default: config.json max_position_embeddings)
    max_gen_toks    generation budget when a task does not set one (default 256)
    add_bos_token   None (default): the tokenizer's own behaviour, as lm-eval's `hf` model;
                    True: make every encoded text start with BOS; False: never add special tokens
    prefix_token_id what an empty context or a rolling window starts from (default BOS, else EOS)
    tokenizer       tokenizer directory or hub id (default: path)
    mesh            (data, fsdp, tensor) mesh shape as DxFxT, -1 = the remaining devices
                    (default 1x-1x1: params sharded over every device); `device` is ignored,
                    JAX uses its default backend (choose it with JAX_PLATFORMS)
    seed            PRNG seed for sampled generations (default 0)

Requests map onto the project's jitted programs. Text is tokenized as lm-eval's `hf` model does
it (`TemplateLM`): a context's trailing spaces move into the continuation, context +
continuation is encoded whole and split at the context's token count, an empty context becomes
`prefix_token_id`, and a text already starting with the BOS text gets no second BOS.

  loglikelihood          `sampling.score` (teacher-forced log p and top-1 p per token) on
                         batches sorted by length and padded to a length bucket (powers of two
                         from 64, capped at max_length + 1); inputs longer than that lose tokens
                         on the left. is_greedy: every continuation token's log p equals the
                         log of the top-1 probability (to GREEDY_TOLERANCE).
  loglikelihood_rolling  lm-eval's disjoint windows of max_length tokens (the first after
                         `prefix_token_id`), scored as above and summed per document.
  generate_until         `sampling.generate` per group of equal generation kwargs, contexts cut
                         on the left to max_length - max_gen_toks. Decoding stops at an
                         end-of-sequence id (the config's, generation_config's, the tokenizer's,
                         and every stop string that is one token) or after max_gen_toks; the text
                         is then cut at the first stop string of `until`. A stop string of several
                         tokens therefore does not end decoding early: the batch runs until every
                         row has emitted an end-of-sequence id or max_gen_toks tokens.
                         do_sample/temperature/top_p/top_k/min_p map to `sampling.Settings`;
                         other generation kwargs are refused unless neutral (num_beams=1, ...).

One process (one host, any number of its devices); lm-eval's multi-process data parallelism
(accelerate / torchrun) is not supported.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

import jax
import numpy as np

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
except ImportError as error:  # the adapter is optional; say how to get it
    raise ImportError(
        f"dasd_jax.lm_eval_adapter needs lm-evaluation-harness ({error}); install it with "
        "`pip install 'lm-eval==0.4.13'` (or the project's [lmeval] extra)") from error
from tqdm import tqdm

from dasd_jax import hf, sampling, sharding
from dasd_jax.errors import UserError, exit_on_user_error

logger = logging.getLogger(__name__)

GREEDY_TOLERANCE = 1e-5  # nats; log p(token) within this of log max_v p(v) counts as the argmax
SMALLEST_BUCKET = 64
# Generation kwargs HF's generate accepts that this decoder can only honour at these values.
NEUTRAL_GEN_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "num_return_sequences": 1,
                      "use_cache": True, "typical_p": 1.0}
MODEL_ARGS = ("path", "pretrained", "dtype", "batch_size", "max_length", "max_gen_toks",
              "add_bos_token", "prefix_token_id", "tokenizer", "mesh", "seed")


def length_buckets(limit: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Padded lengths for sequences of at most `limit` tokens: powers of two from `smallest`
    below `limit`, then `limit` itself (so nothing is padded past the window)."""
    buckets = []
    bucket = smallest
    while bucket < limit:
        buckets.append(bucket)
        bucket *= 2
    return (*buckets, limit)


def parse_mesh(shape: str | Sequence[int]) -> tuple[int, ...]:
    """The mesh shape written DxFxT: "1x-1x1" (or a sequence) -> (1, -1, 1)."""
    if not isinstance(shape, str):
        return tuple(int(size) for size in shape)
    try:
        return tuple(int(size) for size in shape.lower().split("x"))
    except ValueError:
        raise UserError(f"mesh={shape!r}: expected the (data, fsdp, tensor) sizes as DxFxT, "
                        "e.g. 1x-1x1 (-1 = the remaining devices)") from None


@register_model("dasd_jax")
class DasdJaxLM(TemplateLM):
    """A dasd_jax decoder behind lm-eval's `LM` interface; see the module docstring."""

    def __init__(self, path: str | None = None, pretrained: str | None = None,
                 dtype: str | None = "auto", batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 tokenizer: str | None = None, mesh: str | Sequence[int] = "1x-1x1", seed: int = 0,
                 device: str | None = None, max_batch_size: int | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"--model_args {', '.join(sorted(unknown))}: not arguments of the "
                            f"dasd_jax model; it takes {', '.join(MODEL_ARGS)}")
        if (path is None) == (pretrained is None):
            raise UserError("--model_args needs path=CHECKPOINT (an HF directory or hub id; "
                            "pretrained= is a synonym), given once")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise UserError(f"batch_size={batch_size!r}: dasd_jax needs a fixed batch size "
                            "(compiled shapes), e.g. batch_size=16")
        if int(batch_size) < 1 or (max_length is not None and int(max_length) < 2):
            raise UserError(f"batch_size={batch_size} and max_length={max_length} must be at "
                            "least 1 and 2")
        del device, max_batch_size  # lm-eval passes them; JAX places work on its own devices
        self.path = str(path if path is not None else pretrained)
        self.mesh = sharding.make_mesh(parse_mesh(mesh))
        self.cfg, self.params = hf.load(self.path, dtype=None if dtype in (None, "auto") else dtype,
                                        mesh=self.mesh)
        self.tokenizer = hf.load_tokenizer(tokenizer or self.path, self.cfg)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = int(seed)
        if self.eot_token_id is None:
            raise UserError(f"neither the tokenizer nor config.json of {self.path} names an "
                            "end-of-sequence token, which lm-eval needs as its end of text")
        if self.prefix_token_id is None:
            raise UserError("the tokenizer has no BOS or EOS token to start empty contexts "
                            "from; pass prefix_token_id=ID")
        # Scored inputs are context + continuation of up to max_length + 1 tokens (the last
        # token is only a target), as in lm-eval's hf model.
        self.score_buckets = length_buckets(self.max_length + 1)

    # ------------------------------------------------------------------ lm-eval's model surface

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Model args win over lm-eval's additional config (`--batch_size`, `--device`)."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int | None:
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.cfg.eos_token_ids[0] if self.cfg.eos_token_ids else None

    @property
    def prefix_token_id(self) -> int | None:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_path": self.path, "model_num_parameters": self.cfg.num_params,
                "model_dtype": str(self.cfg.param_dtype), "max_length": self.max_length,
                "backend": jax.default_backend(), "devices": jax.device_count()}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; special tokens as lm-eval's hf model adds them (module doc)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos_text = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
            if bos_text and string.startswith(bos_text):
                add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **options)
        bos = self.tokenizer.bos_token_id
        if self.add_bos_token and add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids  # tokenizers whose post-processor adds no BOS (Qwen, char-level)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    def _batches(self, indices: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        """`indices` in lists of at most batch_size, longest first, so a batch shares a bucket."""
        order = sorted(indices, key=lambda i: -lengths[i])
        return [order[start:start + self.batch_size]
                for start in range(0, len(order), self.batch_size)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) per ((context, continuation) text or
        None, context ids, continuation ids)."""
        pairs = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens does not fit in "
                                f"max_length={self.max_length}; raise max_length")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            pairs.append((whole[:len(whole) - len(continuation)], list(continuation)))
        results = [(0.0, True)] * len(pairs)  # an empty continuation costs nothing
        scored = [i for i, (_, continuation) in enumerate(pairs) if continuation]
        for batch in tqdm(self._batches(scored, [len(c) + len(r) for c, r in pairs]),
                          desc="dasd_jax loglikelihood", disable=disable_tqdm):
            padded = batch + [batch[0]] * (self.batch_size - len(batch))
            with sharding.activation_rules(self.mesh):
                stats = sampling.score(self.cfg, self.params, [pairs[i][0] for i in padded],
                                       [pairs[i][1] for i in padded], self.score_buckets)
            for i, (logprob, top1) in zip(batch, stats):
                greedy = np.all(logprob >= np.log(top1.astype(np.float64)) - GREEDY_TOLERANCE)
                results[i] = (float(np.sum(logprob, dtype=np.float64)), bool(greedy))
        for (text, _, _), result in zip(requests, results):
            if text is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", text, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: the sum over lm-eval's disjoint windows."""
        windows, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            for context, target in map(lm_eval_utils.make_disjoint_window,
                                       lm_eval_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _stop_token_ids(self, until: Sequence[str]) -> tuple[int, ...]:
        """Ids of the stop strings that are exactly one token (decoding may end on them)."""
        ids = []
        for stop in until:
            encoded = self.tokenizer.encode(stop, add_special_tokens=False) if stop else []
            if len(encoded) == 1 and self.tok_decode(encoded, skip_special_tokens=False) == stop:
                ids.append(encoded[0])
        return tuple(ids)

    def _settings(self, gen_kwargs: dict) -> tuple[sampling.Settings, list[str]]:
        """(decoding settings, stop strings) for one group's lm-eval generation kwargs."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_p, top_k = float(kwargs.pop("top_p", None) or 1.0), int(kwargs.pop("top_k", None) or 0)
        min_p = float(kwargs.pop("min_p", None) or 0.0)
        kwargs.pop("max_length", None)  # lm-eval's hf model warns and derives it; so do we
        unsupported = {key: value for key, value in kwargs.items()
                       if key not in NEUTRAL_GEN_KWARGS or value != NEUTRAL_GEN_KWARGS[key]}
        if unsupported:
            raise UserError(
                f"generation kwargs {unsupported} are not supported by the dasd_jax decoder; it "
                "honours until, max_gen_toks, do_sample, temperature, top_p, top_k and min_p. "
                "Drop them from the task's generation_kwargs or --gen_kwargs")
        if max_gen_toks >= self.max_length:
            raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                            f"max_length={self.max_length}")
        eos = tuple(dict.fromkeys(
            (*self.cfg.eos_token_ids, self.eot_token_id, *self._stop_token_ids(until))))
        settings = sampling.Settings(
            max_new_tokens=max_gen_toks, temperature=temperature if do_sample else 0.0,
            top_k=top_k, top_p=top_p, min_p=min_p, eos_ids=eos,
            prompt_buckets=length_buckets(self.max_length - max_gen_toks))
        return settings, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's generation, cut at its first stop string."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        results: list[str | None] = [None] * len(requests)
        rng = jax.random.PRNGKey(self.seed)
        progress = tqdm(total=len(requests), desc="dasd_jax generate_until", disable=disable_tqdm)
        for group_number, indices in enumerate(groups.values()):
            settings, until = self._settings(requests[indices[0]].args[1])
            window = self.max_length - settings.max_new_tokens
            prompts = []
            for index in indices:
                ids = self.tok_encode(requests[index].args[0]) or [self.prefix_token_id]
                if len(ids) > window:
                    logger.warning("a context of %d tokens is cut to its last %d (max_length %d "
                                   "- max_gen_toks %d)", len(ids), window, self.max_length,
                                   settings.max_new_tokens)
                prompts.append(ids[-window:])
            for batch in self._batches(range(len(prompts)), [len(p) for p in prompts]):
                padded = batch + [batch[0]] * (self.batch_size - len(batch))
                key = jax.random.fold_in(jax.random.fold_in(rng, group_number), batch[0])
                with sharding.activation_rules(self.mesh):
                    decoded = sampling.generate(self.cfg, self.params,
                                                [prompts[i] for i in padded], settings, key)
                for position, result in zip(batch, decoded):
                    request = requests[indices[position]]
                    text = postprocess_generated_text(self.tok_decode(result.tokens), until, None)
                    results[indices[position]] = text
                    self.cache_hook.add_partial("generate_until", request.args, text)
                progress.update(len(batch))
        progress.close()
        return results


@exit_on_user_error
def main() -> None:
    """`python -m dasd_jax.lm_eval_adapter ARGS`: lm-eval's command line, with "dasd_jax"."""
    from lm_eval.__main__ import cli_evaluate

    if len(sys.argv) == 1:
        sys.argv.append("--help")
    cli_evaluate()


if __name__ == "__main__":
    main()
