"""One resolved run: `resolve(config, workdir)` -> `Run`, the frozen object everything starts from.

Training, `--dry_run`, resume, the converters and the benchmarks all take a `Run`; none of them
works a setting out again. Resolving happens in two stages:

- `resolve(config, workdir, devices)` checks every section against its schema, builds the
  mesh, the model config (`model_config`: an imported checkpoint's shape, and vocab_size 0
  meaning the tokenizer's), the optimizer and the jitted steps (abstract train state, shardings,
  jitted steps). It writes nothing and reads only small files: the workdir's config.json and
  tokenizer, and an `init_from` directory's config.json. Without a workdir it reads no run
  directory at all, so it serves ahead-of-time compilation for devices this host lacks.
- `Run.prepare()` then does the work on disk: it creates the workdir, reads the `init_from`
  weights and tokenizer for a new run and the eval tasks' multiple-choice files, and tokenizes
  the data, the run's own source and the eval tasks' bpb sources in one pass (training the
  tokenizer if the workdir has none). The model does not change: its vocabulary size was
  known before.

The input config is read, never written; `Run.config` is the resolved config (the model
section as the run builds it), which is what the run saves as config.json.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from gptjax import checkpoint as ckpt
from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import optim as optim_lib
from gptjax import schema, sharding
from gptjax.checkpoint_read import read_run_config
from gptjax.errors import UserError
from gptjax.evaluate.multiple_choice import Item, read_items
from gptjax.failures import io_failure
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.state import param_shapes
from gptjax.step import Steps, build_steps
from gptjax.tokenizer import Tokenizer, describe, given_exists, load_given, load_tokenizer, tokenizer_saved


@dataclasses.dataclass(frozen=True)
class Run:
    """A fully resolved run. Built by `resolve`; `prepare` adds what needs the disk."""

    sections: config_lib.Sections  # the config, parsed once
    run_dir: RunDir | None  # None: resolved without a run directory (ahead-of-time compilation)
    model: GPTConfig  # config.model with its vocabulary size (and an import's shape) resolved
    optimizer: optim_lib.Optimizer  # built once; `optimizer.config` is the OptimConfig
    mesh: Mesh
    steps: Steps  # the jitted steps, and the train state's abstract shapes and shardings (steps.layout)
    resuming: bool  # the workdir holds a checkpoint: weights come from it, not init_from
    tokenizer: Tokenizer | None = None  # None until prepared when the workdir has none yet
    dataset: data_lib.Dataset | None = None  # set by prepare()
    # Each eval task's input, in eval.task_list() order (set by prepare()): a multiple-choice
    # file's items, a bpb source's dataset.
    eval_inputs: tuple[list[Item] | data_lib.Dataset, ...] = ()
    pretrained: Any = None  # init_from's host parameters, for a new run (set by prepare())
    devices_note: str = ""  # how the devices were chosen, when the CLI chose them (sharding.default_devices)

    @property
    def seed(self) -> int:
        return self.sections.top.seed

    @property
    def init_from(self) -> str:
        return self.sections.top.init_from

    @property
    def data(self) -> data_lib.DataConfig:
        return self.sections.data

    @property
    def train(self) -> config_lib.TrainConfig:
        return self.sections.train

    @property
    def config(self) -> ml_collections.FrozenConfigDict:
        """The resolved config (the model section as the run builds it): what config.json holds."""
        resolved = dataclasses.replace(self.sections, model=dataclasses.asdict(self.model))
        return ml_collections.FrozenConfigDict(config_lib.to_config(resolved))

    @property
    def tokenizer_note(self) -> str:
        """One line on the tokenizer the run uses (for --dry_run)."""
        t = self.sections.tokenizer
        if self.tokenizer is not None:
            where = f" from {t.path}" if t.path and not self.resuming else ""
            return f"tokenizer: {describe(self.tokenizer)}{where}; model vocabulary {self.model.vocab_size:,}"
        if self.init_from:
            return f"tokenizer: the one of {self.init_from}"
        if t.path:
            return f"tokenizer: {t.path} (tokenizer.path), not there yet: the run needs it"
        return (f"tokenizer: SentencePiece {t.model_type} with {t.vocab_size:,} pieces, trained on the data when "
                "the run starts")

    def prepare(self, data: bool = True) -> "Run":
        """The run with its workdir created, init_from's weights and tokenizer read (a new run),
        and (`data`) the eval tasks' files read and the data tokenized: the run's own source and
        each bpb task's, in one pass. A UserError leaves no new workdir behind; a failed read or
        write is a one-line `RunFailed`.

        Process 0 creates the workdir (a URL needs nothing: objects make their prefixes) and
        removes it after a UserError if it created it."""
        if self.run_dir is None:
            raise ValueError("Run.prepare needs a run resolved with a workdir")
        root = epath.Path(self.run_dir.root)
        leader = jax.process_index() == 0  # the other hosts of a pod only read the workdir here
        created = leader and not root.exists()
        tasks = self.sections.eval.task_list() if data else []
        try:
            if leader and not self.run_dir.is_url:
                os.makedirs(self.run_dir.root, exist_ok=True)
            pretrained, given = None, None
            if self.init_from and not self.resuming:
                _, pretrained, given = _read_init_from(self.init_from, weights=True)
                from gptjax.hf import pad_vocab

                pretrained = pad_vocab(pretrained, self.model)
            # Multiple-choice files are read here: a bad one is refused before any data is tokenized.
            items = [read_items(arg, self.sections.eval.max_items) if kind == "hellaswag" else None
                     for kind, arg in tasks]
            tokenizer, datasets = given or self.tokenizer, []
            if data:
                sources = [self.data.source] + [arg for kind, arg in tasks if kind == "bpb"]
                datasets = data_lib.prepare_sources(self.data, self.sections.tokenizer, self.run_dir, sources,
                                                    tokenizer=given)
                for dataset in datasets:
                    dataset.check(self.train.seq_len)
                tokenizer = datasets[0].tokenizer
            # The tokenizer the data pass used fits the model that was resolved before it.
            if tokenizer is not None and tokenizer.vocab_size > self.model.vocab_size:
                raise UserError(f"the run's tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                                f"{self.model.vocab_size}; use a new workdir")
        except UserError:
            if created:
                root.rmtree(missing_ok=True)
            raise
        except OSError as e:  # a workdir that cannot be made, a full disk: one line
            raise io_failure("preparing the run", e, self.run_dir.root) from e
        bpb = iter(datasets[1:])
        eval_inputs = tuple(next(bpb) if read is None else read for read in items)
        return dataclasses.replace(self, tokenizer=tokenizer, dataset=datasets[0] if datasets else None,
                                   eval_inputs=eval_inputs, pretrained=pretrained)

    def derive(self, **changes: Mapping[str, Any]) -> "Run":
        """A "what if" of this run, resolved on the same devices without a workdir: each keyword
        names a section and maps fields to new values, e.g.
        `run.derive(train={"grad_accum": 8}, model={"n_layer": 2, "scan_layers": False})`.
        The model keeps this run's resolved vocabulary."""
        s = dataclasses.replace(self.sections, model=dataclasses.asdict(self.model))
        sections = {f.name for f in dataclasses.fields(s)}
        for name, fields in changes.items():
            if name not in sections:
                raise ValueError(f"Run.derive: no config section {name!r}; sections: {sorted(sections)}")
            current = getattr(s, name)
            if name == "model":
                unknown = set(fields) - set(current)
                if unknown:
                    raise ValueError(f"Run.derive: no model field(s) {sorted(unknown)}")
                s = dataclasses.replace(s, model={**current, **fields})
            else:
                s = dataclasses.replace(s, **{name: dataclasses.replace(current, **fields)})
        return resolve(s, None, list(self.mesh.devices.flat))


def resolve(
    config: config_lib.ConfigDict | config_lib.Sections, workdir: str | None = None, devices: Sequence[jax.Device] | None = None
) -> Run:
    """Check `config` (a ConfigDict, or one already parsed by `schema.sections`) and resolve the
    run in `workdir` on `devices` (default: `sharding.default_devices`, all of them unless the
    CLI arranged one CPU device per core); write nothing.

    With `workdir=None` no run directory is read: the vocabulary comes from model.vocab_size,
    an init_from checkpoint's config.json, or else tokenizer.vocab_size (the size a tokenizer
    would be trained to).
    """
    s = config
    if not isinstance(s, schema.Sections):
        s = schema.sections(config)
    train = s.train
    devices_note = ""
    if devices is None:
        devices, devices_note = sharding.default_devices(s.mesh, train.micro_batch)
    mesh = sharding.make_mesh(s.mesh, devices)
    _check_batch(train, mesh)
    data_lib.parse_source(s.data.source)

    run_dir = None if workdir is None else RunDir.at(workdir)
    resuming = run_dir is not None and bool(run_dir.steps())
    imported = _read_init_from(s.top.init_from, weights=False)[0] if s.top.init_from else None
    tokenizer = None
    if run_dir is not None and tokenizer_saved(run_dir.tokenizer):
        tokenizer = load_tokenizer(run_dir.tokenizer)
    elif s.tokenizer.path and not imported and (given_exists(s.tokenizer.path) or
                                                 s.model["vocab_size"] == config_lib.MODEL_VOCAB_FROM_TOKENIZER):
        tokenizer = load_given(s.tokenizer.path)  # a given tokenizer (GPT-2's, say): read now, it sizes the model
    if tokenizer is not None:
        tokenizer_vocab = tokenizer.vocab_size
    else:  # the size a tokenizer will be trained to; an imported one comes with its model's size
        tokenizer_vocab = None if imported else s.tokenizer.vocab_size
    gpt = model_config(s.model, tokenizer_vocab, imported, fit=run_dir is not None)
    if train.seq_len > gpt.block_size:
        raise UserError(f"train.seq_len={train.seq_len} is longer than model.block_size={gpt.block_size}")
    saved = read_run_config(run_dir) if resuming else None
    if saved is not None:
        _check_same_shape(run_dir, saved, gpt)
    # Labels depend only on parameter paths: a freeze or lr rule that matches nothing fails here.
    params = param_shapes(gpt, boxed=True)  # with logical axis names: Muon reads the kernels' axes from them
    optimizer = optim_lib.make_optimizer(s.optim, params, train.steps)
    if saved is not None:
        _check_same_optimizer_state(run_dir, saved, params, optimizer)
    steps = build_steps(gpt, optimizer, mesh, s.top.seed, train.grad_accum)
    return Run(
        sections=s,
        run_dir=run_dir,
        model=gpt,
        optimizer=optimizer,
        mesh=mesh,
        steps=steps,
        resuming=resuming,
        tokenizer=tokenizer,
        devices_note=devices_note,
    )


def model_config(
    model: Mapping[str, Any], tokenizer_vocab: int | None, imported: Mapping[str, Any] | None = None, fit: bool = True
) -> GPTConfig:
    """The run's GPTConfig: `config.model`, with an imported checkpoint's shape fields over it,
    and `vocab_size` 0 meaning the tokenizer's (`tokenizer_vocab`). The one place that rule lives.

    `fit`: the model's vocabulary must hold the tokenizer's (off where `tokenizer_vocab` only
    stands in, as without a run directory). `tokenizer_vocab` None: not known yet (an imported
    tokenizer, checked when it is read).
    """
    fields = {**dict(model), **dict(imported or {})}
    if fields["vocab_size"] < 0:
        raise UserError(f"model.vocab_size must be >= 0 (0: the tokenizer's), got {fields['vocab_size']}")
    if fields["vocab_size"] == config_lib.MODEL_VOCAB_FROM_TOKENIZER:
        fields["vocab_size"] = tokenizer_vocab
    gpt = GPTConfig.from_config(fields)
    if fit and tokenizer_vocab is not None and gpt.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={gpt.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); use 0 to take the tokenizer's"
        )
    return gpt


def _check_batch(train: config_lib.TrainConfig, mesh: Mesh) -> None:
    micro, dp = train.micro_batch, sharding.data_parallel_size(mesh)
    if micro % dp:
        raise UserError(
            f"the micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by the "
            f"data-parallel size data*fsdp = {dp}"
        )
    if micro % jax.process_count():
        raise UserError(f"the micro-batch {micro} must be divisible by the number of hosts {jax.process_count()}")


def _check_same_shape(run_dir: RunDir, saved: config_lib.ConfigDict, gpt: GPTConfig) -> None:
    """The model shape is the one the run's checkpoints (its saved config, `saved`) were made with."""
    mine, theirs = ckpt.model_shape(gpt), ckpt.model_shape(saved.model)
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise UserError(
            f"workdir {run_dir.root!r} holds a checkpoint of a different model shape "
            f"(field: (saved, requested) = {diff}); use a new --workdir or the saved shape"
        )


def _check_same_optimizer_state(
    run_dir: RunDir, saved: config_lib.ConfigDict, params: Any, optimizer: optim_lib.Optimizer
) -> None:
    """The optimizer state this run would restore has the structure its checkpoints were saved
    with. A changed rule (layer_decay, freeze, lr_rules, ...) changes it; without this
    check every checkpoint would fail to restore and be set aside as unreadable. `saved` is the
    run's saved config, `params` the parameters' (boxed) shapes."""
    try:
        before = optim_lib.make_optimizer(saved.optim, params, saved.train.steps)
    except UserError:  # settings this version no longer takes: the restore itself will tell
        return

    def layout(o: optim_lib.Optimizer) -> tuple[Any, list[tuple[Any, Any]]]:
        state = jax.eval_shape(o.tx.init, nn.meta.unbox(params))
        return jax.tree_util.tree_structure(state), [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]

    if layout(optimizer) == layout(before):
        return
    now, then = dataclasses.asdict(optimizer.config), dataclasses.asdict(before.config)
    diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    raise UserError(
        f"workdir {run_dir.root!r} holds checkpoints whose optimizer state has another structure than these "
        f"optim settings give (field: (saved, requested) = {diff}); resume with the saved settings "
        f"({run_dir.config}) or use a new --workdir"
    )


def _read_init_from(init_from: str, weights: bool) -> tuple[dict[str, Any], Any, Tokenizer | None]:
    """(model fields, host params, tokenizer) of `init_from=hf:DIR` (DIR may be a gs:// URL; a
    GPT-2 or Llama directory, told apart by its config.json); without weights, the fields alone
    (read from config.json) and None, None. The fields set every architecture option."""
    kind, _, path = init_from.partition(":")
    if kind != "hf" or not path:
        raise UserError(f"init_from must be '' or 'hf:/path/to/hf-dir' (a GPT-2 or Llama directory), got {init_from!r}")
    from gptjax import hf

    if weights:
        fields, params, tokenizer = hf.load_hf_dir(path)
        return hf.imported_fields(fields), params, tokenizer
    return hf.imported_fields(hf.read_hf_config(path)), None, None
