"""The run directory: the one place that names the files of a run.

    <workdir>/config.json         the resolved config of the run (read back by resume and load)
              tokenizer/           the tokenizer the run trains with
              checkpoints/<step>/  params, opt_state, data (orbax items; see gptjax.checkpoint)
              metrics.jsonl        one JSON record per logged step
              tb/                  TensorBoard events
              data/                the token cache (unless data.cache_dir names another place)

Nothing else in gptjax joins these names onto a path: code asks a `RunDir` for them.
"""

from __future__ import annotations

import dataclasses
import os

from gptjax.errors import UserError

RUNS_ROOT = "runs"


def default_workdir(config_path: str | None) -> str:
    """`runs/<config file stem>`, or `runs/default` for the built-in config."""
    stem = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join(RUNS_ROOT, stem or "default")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (an absolute local path)."""

    root: str

    @classmethod
    def at(cls, workdir: str) -> "RunDir":
        return cls(os.path.abspath(os.path.expanduser(str(workdir))))

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

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, str(int(step)))

    def steps(self) -> list[int]:
        """Saved checkpoint steps, ascending (finished or not; orbax decides what is complete)."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(int(n) for n in os.listdir(self.checkpoints) if n.isdigit())

    def exists(self) -> bool:
        """Whether this is a gptjax run (it has a config.json)."""
        return os.path.isfile(self.config)


def find_run(path: str) -> tuple[RunDir, int | None]:
    """(run directory, step) for a run directory or one of its `checkpoints/<step>` directories."""
    run = RunDir.at(path)
    if run.exists():
        return run, None
    parent = RunDir.at(os.path.dirname(os.path.dirname(run.root)))
    name = os.path.basename(run.root)
    if name.isdigit() and os.path.dirname(run.root) == parent.checkpoints and parent.exists():
        return parent, int(name)
    raise UserError(
        f"{run.root!r} is not a gptjax run or checkpoint (expected a workdir with config.json, "
        f"or <workdir>/checkpoints/<step>)"
    )
