"""GPT-2's byte-level BPE, exactly as Hugging Face's, on the `tokenizers` library.

The directory it saves is also a Hugging Face `GPT2TokenizerFast` directory (tokenizer.json,
vocab.json, merges.txt and the transformers configs), so `transformers.AutoTokenizer` loads
it; `from_files` reads such a directory, gptjax's or Hugging Face's. The end-of-text token is
'<|endoftext|>' (GPT-2's, SmolLM's); a tokenizer without it, such as Llama's, ends texts with the
`eos_token` its tokenizer_config.json names (e.g. '</s>'), so its vocabulary stays as trained.
`tokenizers` is imported on use: only runs imported from Hugging Face need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Sequence

from gptjax import storage
from gptjax.errors import UserError
from gptjax.tokenizer.base import EOT, META_FILE, write_meta

if TYPE_CHECKING:
    import tokenizers


class GPT2BPETokenizer:
    """Byte-level BPE exactly as Hugging Face's GPT-2, on the `tokenizers` library."""

    kind = "gpt2"

    def __init__(self, tok: tokenizers.Tokenizer, eot: str = EOT):
        if tok.token_to_id(eot) is None:
            tok.add_special_tokens([eot])
        self._tok = tok
        # '<|endoftext|>' (any special token) written in a document is text, not the end-of-text id.
        self._tok.encode_special_tokens = True
        self.eot_token = eot
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = tok.token_to_id(eot)

    @classmethod
    def from_files(cls, directory: str) -> "GPT2BPETokenizer":
        """Read `directory`/tokenizer.json, or else vocab.json + merges.txt."""
        import tokenizers

        path = storage.join(directory, "tokenizer.json")
        vocab, merges = storage.join(directory, "vocab.json"), storage.join(directory, "merges.txt")
        if storage.is_file(path):
            tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
            model_type = json.loads(tok.to_str())["model"]["type"]
            if model_type != "BPE":
                raise UserError(f"{path} holds a {model_type} model; a GPT-2 tokenizer must be byte-level BPE")
        elif storage.is_file(vocab) and storage.is_file(merges):
            names = ["vocab.json", "merges.txt"]
            with storage.local_copy(directory, names) as local:
                bpe = tokenizers.models.BPE.from_file(*(os.path.join(local, name) for name in names))
            tok = tokenizers.Tokenizer(bpe)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
        else:
            raise UserError(f"no GPT-2 tokenizer in {directory}: expected tokenizer.json or vocab.json + merges.txt")
        return cls(tok, _end_of_text(directory, tok))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        """Write tokenizer.json, vocab.json, merges.txt and the transformers configs, then meta."""
        with storage.local_dir(directory, last=META_FILE) as local:
            self._tok.save(os.path.join(local, "tokenizer.json"))
            self._tok.model.save(local)
            special = {"bos_token": self.eot_token, "eos_token": self.eot_token, "unk_token": self.eot_token}
            with open(os.path.join(local, "special_tokens_map.json"), "w") as f:
                json.dump(special, f, indent=2)
            config = {
                **special,
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
            }
            with open(os.path.join(local, "tokenizer_config.json"), "w") as f:
                json.dump(config, f, indent=2)
            write_meta(local, {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                               "fingerprint": self.fingerprint()})

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


def _end_of_text(directory: str, tok: tokenizers.Tokenizer) -> str:
    """'<|endoftext|>' when the vocabulary has it, else the eos_token of `directory`'s
    tokenizer_config.json when the vocabulary has that (Llama's '</s>'), else '<|endoftext|>'
    (added as a new id)."""
    path = storage.join(directory, "tokenizer_config.json")
    if tok.token_to_id(EOT) is not None or not storage.is_file(path):
        return EOT
    try:
        eos = json.loads(storage.read_text(path)).get("eos_token")
    except (ValueError, AttributeError):
        raise UserError(f"{path} is not a JSON object; expected a Hugging Face tokenizer config") from None
    if isinstance(eos, dict):  # the older serialisation of an AddedToken
        eos = eos.get("content")
    return eos if isinstance(eos, str) and tok.token_to_id(eos) is not None else EOT
