"""One resolved run: `resolve(config, workdir)` -> `Run`, the frozen object everything starts from.

Training, `--dry_run`, resume, the converters and the benchmarks all take a `Run`; none of them
works a setting out again. `resolve(config, workdir, devices)` checks every section against its
schema and builds, in order: the mesh (`gptjax.sharding.run_mesh`), the model
(`gptjax.run_model`: an imported checkpoint's shape, and vocab_size 0 meaning the
tokenizer's), the optimizer, and the jitted steps with the abstract train state and its
shardings (`gptjax.step`). It writes nothing and reads only small files: the workdir's
config.json and tokenizer, and an `init_from` directory's config.json. Without a workdir it
reads no run directory at all, so it serves ahead-of-time compilation for devices this host
lacks. The work on disk (the workdir, init_from's weights, the data) is the next stage,
`gptjax.prepare`.

The input config is read, never written; `Run.config` is the resolved config (the model
section as the run builds it), which is what the run saves as config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from gptjax import data as data_lib
from gptjax import optim as optim_lib
from gptjax import hf, schema, sharding
from gptjax.checkpoint_read import read_run_config
from gptjax.evaluate.multiple_choice import Item
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.run_model import resolve_model
from gptjax.state import param_shapes
from gptjax.step import Steps, build_steps
from gptjax.tokenizer import Tokenizer, describe


@dataclasses.dataclass(frozen=True)
class Run:
    """A fully resolved run. Built by `resolve`; `gptjax.prepare.prepare` adds what needs the disk."""

    sections: schema.Sections  # the config, parsed once
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
    imported: hf.HFDir | None = None  # init_from's directory, its config.json read (its weights: prepare())
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
    def train(self) -> schema.TrainConfig:
        return self.sections.train

    @property
    def config(self) -> ml_collections.FrozenConfigDict:
        """The resolved config (the model section as the run builds it): what config.json holds."""
        resolved = dataclasses.replace(self.sections, model=dataclasses.asdict(self.model))
        return ml_collections.FrozenConfigDict(schema.to_config(resolved))

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
    config: ml_collections.ConfigDict | schema.Sections,
    workdir: str | None = None,
    devices: Sequence[jax.Device] | None = None,
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
    mesh, devices_note = sharding.run_mesh(s.mesh, s.train.micro_batch, devices)
    run_dir = None if workdir is None else RunDir.at(workdir)
    resuming = run_dir is not None and bool(run_dir.steps())
    saved = read_run_config(run_dir) if resuming else None
    imported = hf.read_dir(s.top.init_dir) if s.top.init_dir else None
    gpt, tokenizer = resolve_model(s, imported.model_fields if imported else None, run_dir, saved)
    # Labels depend only on parameter paths: a freeze or lr rule that matches nothing fails here.
    params = param_shapes(gpt, boxed=True)  # with logical axis names: Muon reads the kernels' axes from them
    optimizer = optim_lib.make_optimizer(s.optim, params, s.train.steps)
    if saved is not None:
        optim_lib.check_same_state(optimizer, params, saved, run_dir)
    steps = build_steps(gpt, optimizer, mesh, s.top.seed, s.train.grad_accum)
    return Run(
        sections=s,
        run_dir=run_dir,
        model=gpt,
        optimizer=optimizer,
        mesh=mesh,
        steps=steps,
        resuming=resuming,
        tokenizer=tokenizer,
        imported=imported,
        devices_note=devices_note,
    )

