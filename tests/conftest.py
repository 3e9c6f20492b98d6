"""Test set-up: 8 simulated CPU devices for mesh tests (must happen before jax is imported), a
persistent compilation cache for the session, so the many identical tiny models compile once,
and one tiny trained run (`trained_run`) that the tests needing a run share."""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from filelock import FileLock

# The suite compiles hundreds of small programs and runs each a few times, so XLA's CPU compile
# is most of its time. Without LLVM's optimization passes it takes a third less; with XLA's
# elemental IR emitters for fused loops instead of its MLIR fusion emitters, about half of what
# remains (a 2-layer train step: 0.9 s of CPU instead of 1.8 s); with the LLVM module code-generated
# in one piece instead of split across threads (two test processes already share the two cores),
# another 10-15% (a 4-layer step: 1.11 s instead of 1.25 s). The HLO passes, which decide
# fusion, buffer reuse, in-place updates and what the tests inspect, all still run (with the
# older emitters a few reductions fuse differently). Every process a test starts gets the same
# flags (the tests pass FAST_COMPILE on), so runs compared across processes compute alike.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                " --xla_cpu_parallel_codegen_split_count=1")
# The same with XLA's default (MLIR) fusion emitters, for a process whose output compares two
# differently built programs bit for bit (the benchmark's A/B runs): the older emitters round a
# few fused reductions differently from one program to the other. See `xla_default_fusion_emitters`.
FAST_COMPILE_DEFAULT_EMITTERS = "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1"

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (in the test extra) makes every JAX process try a TPU backend first; tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole test run: made by the process pytest started,
# inherited by its xdist workers and every process a test starts, removed when the run ends.
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptjax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

TRAINED_RUN_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]


def write_program_corpus(directory: str, n_docs: int = 40, n_lines: int = 20) -> str:
    """A small corpus with structure to learn (repetitive, program-like text); returns its glob."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for d in range(n_docs):
        lines = [f"def f{d}_{i}({rng.choice(TRAINED_RUN_WORDS)}):\n    return {rng.choice(TRAINED_RUN_WORDS)} + {i}\n"
                 for i in range(n_lines)]
        with open(os.path.join(directory, f"doc{d:02d}.txt"), "w") as f:
            f.write("".join(lines))
    return os.path.join(directory, "*.txt")


# The test files that take longest, longest first (summed per file from `python -m pytest
# --durations=0`). pyproject.toml's `--dist loadfile --no-loadscope-reorder` hands whole files to
# the workers in collection order, so these start first and the many short files fill in at the
# end, where each worker finishes within seconds of the other. (xdist's own order, files with
# the most tests first, started the one-test notebook and two-host files last, and the run
# waited on them.) A file not listed keeps its place after these; a renamed one just loses its head start.
LONGEST_FILES_FIRST = (
    "test_aot.py", "test_readme.py", "test_fault_inject.py", "test_sampling.py", "test_train.py", "test_gcs.py",
    "test_cpu_devices.py", "test_bench_tools.py", "test_aot_counts.py", "test_multihost.py", "test_blocks.py",
    "test_kernels.py", "test_sample_cli.py", "test_scan_layers.py", "test_notebook.py", "test_finetune.py",
    "test_fastpath.py", "test_model.py", "test_sft.py",
)


def pytest_unconfigure() -> None:
    if _OWN_COMPILATION_CACHE:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of LONGEST_FILES_FIRST first, in its order; every file keeps its own tests' order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def xla_default_fusion_emitters(monkeypatch: pytest.MonkeyPatch) -> None:
    """XLA's default (MLIR) fusion emitters for what this test compiles in this process, in place
    of FAST_COMPILE's older ones (XLA_FLAGS is read once per process, so the setting goes into
    each compile's options). For tests that compare two differently built programs bit for bit
    or to a few ulps: that holds with XLA's default code generation, which users run, and not
    always with the older emitters' roundings."""
    from jax._src import compiler

    get_compile_options = compiler.get_compile_options

    def with_default_emitters(*args, **kwargs):
        overrides = dict(kwargs.get("env_options_overrides") or {})
        overrides.setdefault("xla_cpu_use_fusion_emitters", True)
        return get_compile_options(*args, **{**kwargs, "env_options_overrides": overrides})

    monkeypatch.setattr(compiler, "get_compile_options", with_default_emitters)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished tiny run, trained once per test run (see the `trained_run` fixture).

    `corpus` is the glob of its 40 documents; `workdir` holds config.json, tokenizer/ (a
    300-piece SentencePiece), metrics.jsonl (loss at every step 1-20, val_loss at 10 and 20),
    tb/ and checkpoints/10 and checkpoints/20. It was trained on one device by
    `train.run(self.config(), workdir, devices=jax.devices()[:1])`. Never write into it: tests
    that change the run work on `copy()`; runs of their own that need only its tokenizer start
    from `tokenizer_only()`.
    """

    corpus: str
    workdir: str

    def config(self, **train_overrides):
        """A fresh ConfigDict of the run (2 layers, 4 heads, width 32, block 32; 20 steps of 8 x 32
        tokens, evaluation and checkpoints every 10; mesh data=-1), train fields overridden."""
        from gptjax import config as C

        c = C.base_config()
        c.data.source = f"files:{self.corpus}"
        c.data.val_fraction = 0.1
        c.tokenizer.vocab_size = 300
        c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=32)
        c.train.update(steps=20, batch_size=8, seq_len=32, eval_every=10, eval_batches=2, log_every=1,
                       checkpoint_every=10)
        c.optim.update(lr=3e-3, warmup_steps=2)
        c.mesh.update(data=-1, fsdp=1, tensor=1)
        c.train.update(**train_overrides)
        return c

    def copy(self, dest) -> str:
        """A copy of the whole run at `dest` (which must not exist), for a test that writes to it."""
        shutil.copytree(self.workdir, dest)
        return str(dest)

    def tokenizer_only(self, dest) -> str:
        """A new workdir at `dest` holding only the run's tokenizer: a run there trains from step 0
        without training the tokenizer again."""
        os.makedirs(dest)
        shutil.copytree(os.path.join(self.workdir, "tokenizer"), os.path.join(dest, "tokenizer"))
        return str(dest)


def _train_shared_run(root: str) -> TrainedRun:
    import jax

    from gptjax import train

    run = TrainedRun(corpus=write_program_corpus(os.path.join(root, "corpus")), workdir=os.path.join(root, "run"))
    train.run(run.config(), run.workdir, devices=jax.devices()[:1])
    return run


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `name` of this test run, made by `build(root)` once: under pytest-xdist
    each worker is its own process with its own session fixtures, so it lives in the directory
    that all workers of this test run share (the parent of each worker's base temp), built by
    the first worker to take the lock; the others wait and reuse it. Alone, pytest's base temp
    is this run's own (its parent holds earlier runs' directories)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / name
    done = root / "done"
    with FileLock(str(root) + ".lock"):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            build(root)
            done.write_text("built\n")
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The tiny trained run that tests share (`TrainedRun`), trained once per test run
    (`_built_once`)."""
    root = _built_once(tmp_path_factory, "gptjax-trained-run", lambda root: _train_shared_run(str(root)))
    return TrainedRun(corpus=os.path.join(root, "corpus", "*.txt"), workdir=str(root / "run"))


@pytest.fixture(scope="session")
def trained_mesh_run(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The workdir of the shared run (`trained_run`) trained again from its tokenizer on a mesh
    of the 8 CPU devices (data, fsdp and tensor 2 each): the same config, 20 steps, evaluations
    and checkpoints (10, 20). For the tests that compare a mesh run with the one-device run and
    those that need checkpoints saved from a mesh; built once per test run, like `trained_run`.
    Never write into it."""

    def train_on_a_mesh(root) -> None:
        from gptjax import train

        config = trained_run.config()
        config.mesh.update(data=2, fsdp=2, tensor=2)
        train.run(config, trained_run.tokenizer_only(root / "run"))

    root = _built_once(tmp_path_factory, "gptjax-trained-mesh-run", train_on_a_mesh)
    return str(root / "run")
