"""The lm-eval adapter scores, rolls and generates as transformers does on the same model."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from dasd_jax import char_tokenizer
from dasd_jax.errors import UserError
from dasd_jax.lm_eval_adapter import DasdJaxLM
from tests import tiny_models

BOS, EOS = 1, 2  # the tiny models' and the character tokenizer's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a character tokenizer that covers all 256 ids (so every
    generated id decodes to text), and the same model in transformers."""
    directory = tmp_path_factory.mktemp("lm_eval_llama")
    tiny_models.save_tiny_model("llama", directory)
    alphabet = char_tokenizer.DEFAULT_ALPHABET
    extra = "".join(chr(0x100 + i) for i in range(256 - 7 - len(alphabet)))
    char_tokenizer.build(alphabet + extra).save_pretrained(directory)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager").eval()
    return directory, torch_model


@pytest.fixture(scope="module")
def lm(checkpoint):
    return DasdJaxLM(path=str(checkpoint[0]), dtype="float32", batch_size=4)


def request(kind, *arguments):
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def encode(lm, text):
    return lm.tokenizer.encode(text, add_special_tokens=False)


def torch_logprobs(torch_model, ids):
    """float64[T, V]: log p(next token | ids[:t+1]) under transformers."""
    logits = tiny_models.torch_logits(torch_model, np.asarray([ids]))[0]
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()


def torch_greedy_text(lm, torch_model, context, new_tokens):
    """transformers' greedy continuation, through the first end-of-sequence token, as text."""
    ids = encode(lm, context)
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    if EOS in out:
        out = out[:out.index(EOS) + 1]
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def test_loglikelihood_equals_a_teacher_forced_transformers_pass_and_flags_greedy_continuations(
        lm, checkpoint):
    torch_model = checkpoint[1]
    greedy = torch_greedy_text(lm, torch_model, "Q: 2+3=?\nA:", 4)
    pairs = [("Natalia sold clips", " to 48 of her friends"),  # split at the context's tokens
             ("trailing spaces  ", "move into the continuation"),
             ("", "an empty context starts from BOS"),
             ("Q: 2+3=?\nA:", greedy)]
    results = lm.loglikelihood([request("loglikelihood", c, r) for c, r in pairs])

    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        head = encode(lm, context.rstrip()) if context else [BOS]
        tail = encode(lm, context[len(context.rstrip()):] + continuation)
        table = torch_logprobs(torch_model, head + tail)
        rows = [len(head) - 1 + i for i in range(len(tail))]
        assert logprob == pytest.approx(sum(table[r, t] for r, t in zip(rows, tail)), abs=1e-3)
        assert is_greedy == all(table[r].argmax() == t for r, t in zip(rows, tail))
    assert [is_greedy for _, is_greedy in results] == [False, False, False, True]


@pytest.mark.slow
def test_generate_until_cuts_greedy_transformers_output_at_the_first_stop_string(lm, checkpoint):
    torch_model = checkpoint[1]
    contexts = ["The answer is", "Question: what is 7 times 6?\nAnswer:"]
    full = [torch_greedy_text(lm, torch_model, context, 24) for context in contexts]
    assert min(map(len, full)) >= 16, "the fixture's contexts must decode long enough to cut"
    several_tokens, one_token = full[0][8:10], full[0][12]
    requests = [
        request("generate_until", contexts[0], {"until": [several_tokens], "max_gen_toks": 24}),
        request("generate_until", contexts[1], {"until": ["@@never@@"], "max_gen_toks": 24}),
        request("generate_until", contexts[0], {"until": [one_token], "max_gen_toks": 24,
                                                "do_sample": False}),
    ]
    assert lm.generate_until(requests) == [full[0].split(several_tokens)[0], full[1],
                                           full[0].split(one_token)[0]]


def test_loglikelihood_rolling_sums_lm_evals_disjoint_windows_of_max_length(checkpoint):
    directory, torch_model = checkpoint
    lm = DasdJaxLM(path=str(directory), dtype="float32", batch_size=4, max_length=16)
    text = "Natalia sold 48 clips in April and half "  # 40 tokens: three windows of 16
    ids = encode(lm, text)
    assert len(ids) == 40
    # (tokens fed, how many of the last are scored): the first window follows BOS; the last
    # one keeps a full window of context for its 8 new tokens.
    windows = [([BOS] + ids[:16], 16), (ids[15:32], 16), (ids[23:40], 8)]
    short = "half as many"

    def scored(tokens, count):
        table = torch_logprobs(torch_model, tokens)
        return sum(table[j - 1, tokens[j]] for j in range(len(tokens) - count, len(tokens)))

    results = lm.loglikelihood_rolling([request("loglikelihood_rolling", text),
                                        request("loglikelihood_rolling", short)])
    assert results[0] == pytest.approx(sum(scored(*w) for w in windows), abs=1e-3)
    short_ids = [BOS] + encode(lm, short)
    assert results[1] == pytest.approx(scored(short_ids, len(short_ids) - 1), abs=1e-3)


def test_the_registered_model_takes_model_args_over_lm_evals_cli_defaults(checkpoint):
    model_class = get_model("dasd_jax")
    assert model_class is DasdJaxLM
    lm = model_class.create_from_arg_string(
        f"path={checkpoint[0]},dtype=float32,batch_size=2,max_length=64,add_bos_token=True",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert (lm.batch_size, lm.max_length) == (2, 64)
    assert lm.tok_encode("hi") == [BOS] + encode(lm, "hi")
    assert lm.tok_encode("<s>hi") == [BOS] + encode(lm, "hi")  # no second BOS


def test_settings_the_decoder_cannot_honour_are_refused(lm, checkpoint):
    with pytest.raises(UserError, match="num_beams"):
        lm.generate_until([request("generate_until", "Hi", {"until": ["."], "num_beams": 4})])
    with pytest.raises(UserError, match="fixed batch size"):
        DasdJaxLM(path=str(checkpoint[0]), batch_size="auto")
