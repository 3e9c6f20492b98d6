"""What every tokenizer shares: the `Tokenizer` interface, the end-of-text text and the meta file.

A saved tokenizer is a directory (local or a URL) whose `tokenizer_meta.json` (META_FILE) says
what kind it is; that file is written last, so a directory with it is complete.
"""

from __future__ import annotations

import json
from typing import Protocol, Sequence

from gptjax import storage

EOT = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"


class Tokenizer(Protocol):
    """What the rest of gptjax needs from a tokenizer."""

    kind: str  # 'sentencepiece' | 'gpt2'
    vocab_size: int
    eot_id: int  # end of text: joins documents, default stop token for sampling

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no end-of-text id added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, on all cores."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the end-of-text id reads as '<|endoftext|>', ids past the vocabulary as nothing."""

    def save(self, directory: str) -> None:
        """Write the tokenizer's files and tokenizer_meta.json into `directory`."""

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and rules: equal fingerprints encode equally."""


def write_meta(directory: str, meta: dict) -> None:
    """Write `directory`/tokenizer_meta.json: call it after the tokenizer's other files."""
    storage.write_text(storage.join(directory, META_FILE), json.dumps(meta, indent=2, sort_keys=True))
