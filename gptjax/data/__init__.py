"""Data: document sources -> token streams cached on disk -> deterministic batches.

    sources.py   each term of `data.source` (stdlib, files:, hf:, tfds:, pairs:, weighted mixtures;
                 its syntax is `gptjax.source_syntax`'s, checked by the schema): its documents,
                 split into training and validation by name
    formats.py   the file formats files: reads (.jsonl, .parquet, text), and files it refuses
    units.py     a source cut into units (file groups, byte ranges, row groups) for workers
    reading.py   each unit's documents; hf_source.py: hf:NAME (Hugging Face datasets)
    parts.py     one unit encoded into a part; the parts merged in order into the cache
    parallel.py  the units encoded on worker processes, and shared by a pod's hosts
    cache.py     the token cache: documents encoded once into train/val .bin files + meta.json
    batches.py   Dataset: the batch for a step as a function of (seed, step), and eval batches;
                 supervised examples packed whole into rows with segment ids
    progress.py  what preparation prints (stderr, process 0): one line per source, progress
    hosts.py     a pod prepares once: host 0 builds the tokenizer and writes the caches (every
                 host encodes its share of the units), the others wait

Paths that may be URLs (gs://...) go through `gptjax.storage`, and so does the host-local copy
of a bucket's cache.

`prepare` ties them together for a run: the run's tokenizer (see gptjax.tokenizer) and one
cached token stream per source; `prepare_sources` does the same for the run's own source and
the other sources it evaluates on (eval.tasks' bpb:SOURCE), in one pass.

What a pod's hosts must share: the workdir (its tokenizer/ and data/) and data.cache_dir,
local paths on a shared file system or gs:// URLs; host 0 writes them, the others read them.
The input files too: a cache's name depends on their names, sizes and modification times.
What may be host-local: the copies of a gs:// token cache that each host memory-maps.
"""

from __future__ import annotations

import os
from typing import Sequence

from gptjax import storage
from gptjax.data.batches import Dataset
from gptjax.data.cache import TokenStream, token_dtype, token_streams
from gptjax.data.hosts import STATUS_FILE, Beacon, Hosts, wait_for
from gptjax.data.progress import Progress, short_path
from gptjax.data.sources import resolve
from gptjax.source_syntax import SourceSpec, parse_source
from gptjax.data.units import stdlib_files
from gptjax.layout import RunDir
from gptjax.schema import DataConfig, TokenizerConfig
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer, describe, load_given, load_tokenizer, tokenizer_saved, workdir_tokenizer

__all__ = ["DataConfig", "Dataset", "SourceSpec", "TokenStream", "parse_source", "prepare", "prepare_sources",
           "stdlib_files", "token_dtype"]


def prepare(data: DataConfig, tokenizer_config: TokenizerConfig, run: RunDir, *, tokenizer: Tokenizer | None = None,
            process_index: int | None = None, process_count: int | None = None) -> Dataset:
    """Tokenizer and token streams for `data.source`, built once and cached in the run directory.

    Without `tokenizer`, the one tokenizer.path names is used (and saved in the run), else the
    run's tokenizer/ is loaded, or a SentencePiece model is trained
    (as `tokenizer_config` says) and saved there. A given tokenizer (e.g. GPT-2's, from an
    imported checkpoint) is used as is and saved there when none is.
    Of a pod's processes (default: jax.process_index() of jax.process_count()) only process 0
    trains, saves and tokenizes; the others wait for its results (see gptjax.data.hosts).
    What is done is printed to stderr on process 0. The run directory and data.cache_dir may be
    URLs.
    """
    return prepare_sources(data, tokenizer_config, run, [data.source], tokenizer=tokenizer,
                           process_index=process_index, process_count=process_count)[0]


def prepare_sources(data: DataConfig, tokenizer_config: TokenizerConfig, run: RunDir, sources: Sequence[str], *,
                    tokenizer: Tokenizer | None = None, process_index: int | None = None,
                    process_count: int | None = None) -> list[Dataset]:
    """A Dataset for each of `sources` (`data.source` strings, read with `data`'s other
    settings): the run's own first, then any others the run evaluates on, all tokenized with
    the run's tokenizer, which comes as `prepare` says from the first."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    hosts = Hosts(int(process_index), int(process_count), float(data.host_wait_s),
                  storage.join(run.data_cache, STATUS_FILE))
    with Beacon(hosts):
        return _prepare(data, tokenizer_config, run, sources, tokenizer, hosts)


def _prepare(cfg: DataConfig, tokenizer_config: TokenizerConfig, run: RunDir, sources: Sequence[str],
             tokenizer: Tokenizer | None, hosts: Hosts) -> list[Dataset]:
    specs = [[s for s in parse_source(source) if s.weight > 0] for source in sources]
    resolved = [[resolve(s, cfg, download=hosts.builds) for s in group] for group in specs]
    progress = Progress(hosts.index == 0)
    if tokenizer is None and tokenizer_config.path:
        tokenizer = load_given(tokenizer_config.path)
        if tokenizer_saved(run.tokenizer) and load_tokenizer(run.tokenizer).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{run.tokenizer} holds another tokenizer than tokenizer.path={tokenizer_config.path!r} "
                            "names; use a new workdir, or leave tokenizer.path empty to keep the run's")
    if tokenizer is None:
        tokenizer = _workdir_tokenizer(tokenizer_config, cfg, run.tokenizer, resolved[0], progress, hosts)
    elif hosts.builds and not tokenizer_saved(run.tokenizer):
        tokenizer.save(run.tokenizer)
        progress.say(f"tokenizer: {describe(tokenizer)}, given; saved to {short_path(run.tokenizer)}")
    else:
        progress.say(f"tokenizer: {describe(tokenizer)}, given")
    cache_root = (cfg.cache_dir if storage.is_url(cfg.cache_dir) else os.path.expanduser(cfg.cache_dir)) \
        or run.data_cache
    datasets = []
    for group, srcs in zip(specs, resolved):
        streams = [token_streams(s, tokenizer, cache_root, progress, hosts, cfg.workers) for s in srcs]
        datasets.append(Dataset(tokenizer, [s.name for s in group], [s.weight for s in group],
                                [t for t, _ in streams], [v for _, v in streams], packing=cfg.packing,
                                long_examples=cfg.long_examples, document_mask=cfg.document_mask, say=progress.say))
    return datasets


def _workdir_tokenizer(t: TokenizerConfig, cfg: DataConfig, directory: str, sources: list, progress: Progress,
                       hosts: Hosts) -> Tokenizer:
    """The run's tokenizer: trained and saved by process 0 unless saved already; the others wait."""
    if not hosts.builds:
        wait_for(lambda: tokenizer_saved(directory), directory, "the tokenizer", hosts)
        return load_tokenizer(directory)
    texts = [(s.spec.weight, s.training_texts()) for s in sources]
    return workdir_tokenizer(short_path(directory), t.vocab_size, t.model_type, t.max_chars, texts, progress.say)
