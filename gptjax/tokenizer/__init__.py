"""Tokenizers: SentencePiece (trained here) and GPT-2 byte-level BPE behind one small interface.

Both turn any Unicode text into ids and back exactly (`decode(encode(s)) == s`), both have an
end-of-text id that joins documents in the token streams and stops sampling, and neither turns
the *text* '<|endoftext|>' inside a document into that id: only the data pipeline inserts it.
`save` writes a directory that `load_tokenizer` reads back. Directories may be URLs (gs://...);
files go through `gptjax.storage`.

    base.py       the `Tokenizer` interface, EOT, the meta file every saved tokenizer has
    spm.py        SentencePieceTokenizer and `train_sentencepiece`
    gpt2_bpe.py   GPT2BPETokenizer (Hugging Face GPT-2's byte-level BPE; `tokenizers` on use)
    load.py       `load_tokenizer`, `tokenizer_saved`, `describe`, `load_given` (tokenizer.path)
    workdir.py    `workdir_tokenizer`: a run's tokenizer, loaded or trained on its documents
"""

from gptjax.tokenizer.base import EOT, META_FILE, Tokenizer
from gptjax.tokenizer.gpt2_bpe import GPT2BPETokenizer
from gptjax.tokenizer.load import describe, given_exists, load_given, load_tokenizer, tokenizer_saved
from gptjax.tokenizer.spm import SentencePieceTokenizer, train_sentencepiece
from gptjax.tokenizer.workdir import training_texts, workdir_tokenizer

__all__ = ["EOT", "GPT2BPETokenizer", "META_FILE", "SentencePieceTokenizer", "Tokenizer", "describe", "given_exists",
           "load_given", "load_tokenizer", "tokenizer_saved", "train_sentencepiece", "training_texts", "workdir_tokenizer"]
