"""The run directory: the one place that names the files of a run.

    <workdir>/config.json         the resolved config of the run (read back by resume and load)
              tokenizer/           the tokenizer the run trains with
              checkpoints/<step>/  params, opt_state, data (orbax items; see gptjax.checkpoint)
              metrics.jsonl        one JSON record per logged step
              tb/                  TensorBoard events
              data/                the token cache (unless data.cache_dir names another place)
              wandb_run_id         the Weights & Biases run this run logs to (with wandb.enabled)

Nothing else in gptjax joins these names onto a path: code asks a `RunDir` for them. A workdir
may be a URL (gs://bucket/run): its paths are then URLs too, and what is read here goes through
`gptjax.storage` or etils.epath, which serve local paths and object stores alike.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath

from etils import epath

from gptjax import storage
from gptjax.errors import UserError

RUNS_ROOT = "runs"


def default_workdir(config_path: str | None) -> str:
    """`runs/<config file stem>`, or `runs/default` for the built-in config."""
    stem = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join(RUNS_ROOT, stem or "default")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (an absolute local path, or a URL such as gs://bucket/run)."""

    root: str

    @classmethod
    def at(cls, workdir: str) -> "RunDir":
        """The run directory `workdir`: a local path made absolute, a URL as given."""
        workdir = str(workdir)
        if storage.is_url(workdir):
            return cls(workdir.rstrip("/"))
        return cls(os.path.abspath(os.path.expanduser(workdir)))

    @property
    def is_url(self) -> bool:
        return storage.is_url(self.root)

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "tokenizer")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tb")

    @property
    def data_cache(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def wandb_run_id(self) -> str:
        return os.path.join(self.root, "wandb_run_id")

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, str(int(step)))

    def steps(self) -> list[int]:
        """Saved checkpoint steps, ascending (finished or not; orbax decides what is complete)."""
        directory = epath.Path(self.checkpoints)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def exists(self) -> bool:
        """Whether this is a gptjax run (it has a config.json)."""
        return storage.is_file(self.config)


def find_run(path: str) -> tuple[RunDir, int | None]:
    """(run directory, step) for a run directory or one of its `checkpoints/<step>` directories."""
    run = RunDir.at(path)
    if run.exists():
        return run, None
    parent = RunDir.at(posixpath.dirname(posixpath.dirname(run.root)))
    name = posixpath.basename(run.root)
    if name.isdigit() and posixpath.dirname(run.root) == parent.checkpoints and parent.exists():
        return parent, int(name)
    raise UserError(
        f"{run.root!r} is not a gptjax run or checkpoint (expected a workdir with config.json, "
        f"or <workdir>/checkpoints/<step>)"
    )
