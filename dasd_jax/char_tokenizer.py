"""A character-level Hugging Face tokenizer, built with the `tokenizers` library.

Used for models the package makes itself (the embedded default checkpoint, tests, the demo
world). Optionally some whole words and the numbers 0-999 are single tokens too (the demo world's
vocabulary: a 2-layer model copies a number from its context far more easily as one token than
as two or three digits); any other text still falls back to one token per character. It is an
ordinary `PreTrainedTokenizerFast` with special tokens and a chat template, so it saves with
`save_pretrained` and loads back through `hf.load_tokenizer` like any checkpoint's.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


NUMBERS = tuple(str(n) for n in range(1000))


def build(alphabet: str = DEFAULT_ALPHABET, words: Sequence[str] = (),
          numbers: bool = False) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, after the special tokens (ids 0..6); then one token
    per word of `words` (letters only, matched whole) and, with `numbers`, per number 0-999
    written without leading zeros and not part of a longer digit run, each also with one leading
    space (" add", " 75"), which halves the length of running text."""
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    characters = list(dict.fromkeys(alphabet))
    words = list(dict.fromkeys(words))
    for word in words:
        if not re.fullmatch(r"[A-Za-z]{2,}", word):
            raise ValueError(f"tokenizer word {word!r}: must be two or more ASCII letters")
    whole = words + (list(NUMBERS) if numbers else [])
    vocab = {token: i for i, token in enumerate(
        specials + characters + whole + [" " + token for token in whole])}
    pieces = []
    if words:  # longest first, so a word is never cut at a shorter one it starts with
        pieces.append(r" ?\b(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")\b")
    if numbers:
        number = r"(?:[1-9][0-9]{0,2}|0)(?![0-9])"
        pieces += [" " + number, r"(?<![0-9])" + number]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(pieces + [r"[\s\S]"])),
                                                   behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
    )
