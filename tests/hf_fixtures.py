"""A tiny random Hugging Face GPT-2 directory, built locally (no network), for the tests that import one.

`build_hf_dir` trains a small byte-level BPE laid out as GPT-2's (with `tokenizers`), makes a
random-initialised `GPT2LMHeadModel` (transformers on PyTorch CPU) and saves both with
`save_pretrained`, as a user's fine-tuned or downloaded checkpoint would be saved.
"""

from __future__ import annotations

import inspect
import json

import tokenizers
import torch
import transformers

from gptjax.tokenizer import EOT

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\t\tand   runs of    spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский, עברית",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "numbers 1234567890 3.14159 -42 1e-5 and symbols @#$%^&*()[]{}",
    "def f(x):\n    return x ** 2  # code\n",
    "'s 't 're 've 'm 'll 'd it's they're",
    "\u2581 literal lower-one-eighth block and zero\u200bwidth space",
    "",
    " ",
]
LITERAL_EOT = ["first document<|endoftext|>second", "a <|endoftext|> b <|endoftext|>"]


def corpus() -> list[str]:
    """Varied training text: Python sources, their docstrings, and the samples above."""
    import argparse
    import json as json_mod
    import textwrap as tw

    return [inspect.getsource(m) for m in (argparse, json_mod.decoder, tw)] + TEXTS * 20


def train_bpe(vocab_size: int = 700) -> tokenizers.Tokenizer:
    """Byte-level BPE laid out as GPT-2's: '<|endoftext|>' is the last id, in vocab.json too."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOT] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    out.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    out.decoder = tokenizers.decoders.ByteLevel()
    out.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    out.add_special_tokens([EOT])
    return out


def randomize(model: torch.nn.Module) -> None:
    """Every weight random (LayerNorm scales near 1) so that no mapping error hides behind zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "ln_" in name and name.endswith("weight") else 0.1 * noise)


def build_hf_dir(
    directory: str, *, vocab_size: int = 700, n_positions: int = 128, n_embd: int = 64, n_layer: int = 2, n_head: int = 4
) -> str:
    """Save a tiny random GPT2LMHeadModel (safetensors) and its BPE tokenizer in `directory`."""
    tok = train_bpe(vocab_size)
    hf_tok = transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tok.token_to_id(EOT), eos_token_id=tok.token_to_id(EOT),
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(model)
    model.save_pretrained(directory, safe_serialization=True)
    hf_tok.save_pretrained(directory)
    return directory
