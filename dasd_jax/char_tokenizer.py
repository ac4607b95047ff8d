"""A character-level Hugging Face tokenizer, built with the `tokenizers` library.

Used for models the package makes itself (the embedded default checkpoint, tests, the demo
world). It is an ordinary `PreTrainedTokenizerFast` with special tokens and a chat template, so it
saves with `save_pretrained` and loads back through `hf.load_tokenizer` like any checkpoint's.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, after the special tokens (ids 0..6)."""
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    characters = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
    )
