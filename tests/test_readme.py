"""Every shell command in README.md runs.

The test reads each ```bash block of the README, in order, and runs every command in one
scratch directory (with `configs/` and `tools/` linked in), as a user following the README
would, in a shell without this suite's 8 simulated devices. Where a command would take long,
download, or install, its runner appends small overrides or makes the local files it needs
(a tiny corpus, a tiny Hugging Face GPT-2 directory); the command itself is run as written.
The sample line that training prints at its end is run too, exactly as printed.

A README command that no runner below knows fails the test: add a runner when you add one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable

import pytest
from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e (\S+) && (.+)$")
# A short run of any training command: later overrides win over the command's own.
FAST_TRAIN = (
    " --config.train.steps=4 --config.train.eval_every=2 --config.train.eval_batches=1"
    " --config.train.checkpoint_every=2 --config.train.log_every=1 --config.optim.warmup_steps=0"
    " --config.train.batch_size=8"
)
TINY_CORPUS = "files:corpus.txt"


def readme_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks, in order; a trailing backslash continues a line."""
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def shell(command: str, cwd: str, timeout: int = 600) -> Result:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell: one CPU device
    if FAST_COMPILE in os.environ.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = FAST_COMPILE  # the suite's compile setting (tests/conftest.py)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(r.returncode, r.stdout, r.stderr)


def ok(r: Result, what: str) -> Result:
    assert r.code == 0, f"{what} exited {r.code}:\n{r.err[-3000:]}\n{r.out[-2000:]}"
    return r


def write_corpus(cwd: str) -> None:
    path = os.path.join(cwd, "corpus.txt")
    if not os.path.exists(path):
        with open(path, "w") as f:
            words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
            for i in range(400):
                line = " ".join(words[(i * j) % len(words)] for j in range(1, 12))
                f.write(f"def {words[i % len(words)]}_{i}(x):\n    return x * {i} + {i % 7}  # {line}\n\n")


# -- runners: each gets (command, scratch dir) and runs it, checking what it should write --------


def run_install_line(command: str, cwd: str) -> None:
    """The two quick-start lines: the install prefix is checked, the command after it is run."""
    m = INSTALL.match(command)
    assert m, command
    extra, rest = m.groups()
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    if extra != ".":
        name = re.fullmatch(r'"\.\[(\w+)\]"', extra)
        assert name and re.search(rf"^{name.group(1)} = \[", pyproject, re.M), f"no extra {extra} in pyproject.toml"
    if rest == "python -m pytest":
        r = ok(shell("python -m pytest --collect-only", ROOT), rest)
        counts = re.findall(r"^tests/\S+\.py: (\d+)$", r.out, re.M) or re.findall(r"(\d+) tests? collected", r.out)
        assert counts and sum(map(int, counts)) > 100, r.out[-500:]
        return
    assert rest == "python -m gptjax.train", rest
    r = ok(shell(rest + FAST_TRAIN + " --config.tokenizer.max_chars=1000000", cwd), rest)
    assert os.path.isfile(os.path.join(cwd, "runs", "default", "config.json"))
    printed = [line for line in r.out.splitlines() if line.startswith("sample:")]
    assert len(printed) == 1, r.out
    sample_line = printed[0][len("sample:"):].strip()
    s = ok(shell(sample_line, cwd), f"the printed line {sample_line!r}")
    assert len(s.out.strip()) > len("def "), s.out
    assert "tokens/s" in s.err


def run_train(command: str, cwd: str) -> None:
    """A training command: shortened; TFDS and Hugging Face inputs replaced by local files."""
    args = shlex.split(command)
    extra = FAST_TRAIN
    config = args[args.index("--config") + 1] if "--config" in args else ""
    if "tfds:" in _config_source(config) and "--config.data.source" not in command:
        write_corpus(cwd)
        extra += f" --config.data.source={TINY_CORPUS} --config.tokenizer.vocab_size=300"
    if "my_news.jsonl" in command:
        _write_news(cwd)
    if "hf:gpt2" in command:
        _hf_dir(os.path.join(cwd, "gpt2"))
    else:
        extra += " --config.model.n_layer=1"  # compiles in a fraction of the time (an import fixes its own depth)
    dry = "--dry_run" in args
    before = set(_walk(cwd))
    r = ok(shell(command + ("" if dry else extra), cwd), command)
    if dry:
        assert "lr" in r.out and len(r.out.splitlines()) > 3, r.out
        created = sorted(p for p in set(_walk(cwd)) - before if p.startswith("runs"))
        assert not created, f"--dry_run wrote {created}"
        return
    workdir = args[args.index("--workdir") + 1] if "--workdir" in args else _default_workdir(config)
    assert os.path.isdir(os.path.join(cwd, workdir, "checkpoints")), f"{command} wrote no checkpoint in {workdir}"
    assert "sample:" in r.out


def run_sample(command: str, cwd: str) -> None:
    if "--prompt_file prompt.txt" in command:
        with open(os.path.join(cwd, "prompt.txt"), "w") as f:
            f.write("def main():\n")
    r = ok(shell(command, cwd), command)
    assert "tokens/s" in r.err
    args = shlex.split(command)
    n = int(args[args.index("--num_samples") + 1]) if "--num_samples" in args else 1
    if n > 1:
        assert r.out.count("sample ") >= n, r.out


def run_hf_download(command: str, cwd: str) -> None:
    """No network here: build the files it downloads (a tiny random GPT-2) where it puts them."""
    args = shlex.split(command)
    target = os.path.join(cwd, args[args.index("--local-dir") + 1])
    _hf_dir(target)
    names = set(args[3 : args.index("--local-dir")])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, f"gptjax reads these files; got {names}"


def run_convert(command: str, cwd: str) -> None:
    args = shlex.split(command)
    if "--hf_dir" in args:
        _hf_dir(os.path.join(cwd, args[args.index("--hf_dir") + 1]))
    ok(shell(command, cwd), command)
    out = os.path.join(cwd, args[args.index("--out") + 1])
    expected = "model.safetensors" if args[2] == "export" else "config.json"
    assert os.path.isfile(os.path.join(out, expected)), f"{command} wrote no {expected}"


def run_bench_train(command: str, cwd: str) -> None:
    """The benchmark's flags as written, on its smoke-test shape (--quick), without the references
    (--paired, which times them in its own process: with them, for two rounds)."""
    if "--paired" in command:
        command = re.sub(r"--paired \d+", "--paired 2", command)
        r = ok(shell(command + " --quick", ROOT), command)
    else:
        r = ok(shell(command + " --quick --no_torch", ROOT), command)
    expected = ("guard cost" if "--guard_ab" in command else "initial weights" if "--check" in command
                else "vs nanoGPT tokens/s (range" if "--paired" in command else "| gptjax")
    assert expected in r.out, r.out[-2000:]


def run_bench_sample(command: str, cwd: str) -> None:
    shortened = re.sub(r"--shapes \S+", "--shapes default", command)
    shortened = re.sub(r"--batches \S+", "--batches 1", shortened)
    r = ok(shell(shortened + " --repeats 1 --no_hf", ROOT), shortened)
    assert "default" in r.out, r.out[-2000:]


def run_compare_trainer(command: str, cwd: str) -> None:
    """The comparison as written, on few steps and examples."""
    r = ok(shell(command + " --steps 4 --examples 200 --batch_size 4 --seq_len 64 --eval_every 2 --first 4 --warmup 1", ROOT), command)
    assert "max relative difference" in r.out, r.out[-2000:]


def run_aot(command: str, cwd: str) -> None:
    """The fit check as written, on a small GPT-2 shape so that it compiles in seconds."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('needs libtpu (pip install -e ".[tpu]", part of the test extra)')
    small = (" --config.model.n_layer=2 --config.model.n_embd=128 --config.model.n_head=2 --config.model.block_size=128"
             " --config.train.seq_len=128 --config.train.batch_size=64 --config.train.grad_accum=1 --config.tokenizer.vocab_size=1024")
    r = ok(shell(command + small, cwd), command)
    assert "fits" in r.out and "HBM" in r.out, r.out[-2000:]


RUNNERS: list[tuple[str, Callable[[str, str], None]]] = [
    (r"^python3 -m venv ", run_install_line),
    (r"^(XLA_FLAGS=\S+ )?python -m gptjax\.train( |$)", run_train),
    (r"^python -m gptjax\.sample ", run_sample),
    (r"^hf download ", run_hf_download),
    (r"^python tools/convert_hf\.py (import|export) ", run_convert),
    (r"^python -m gptjax\.aot ", run_aot),
    (r"^python tools/bench_train\.py ", run_bench_train),
    (r"^python tools/bench_sample\.py ", run_bench_sample),
    (r"^python tools/compare_trainer\.py( |$)", run_compare_trainer),
]


def runner_for(command: str) -> Callable[[str, str], None]:
    found = [run for pattern, run in RUNNERS if re.match(pattern, command)]
    if len(found) != 1:
        raise AssertionError(f"README command without a runner in tests/test_readme.py: {command!r}")
    return found[0]


# -- helpers -------------------------------------------------------------------------------------


def _walk(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("configs", "tools")]
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return out


def _config_source(config: str) -> str:
    if not config:
        return "stdlib"
    from gptjax.config import load_config

    return load_config(os.path.join(ROOT, config)).data.source


def _default_workdir(config: str) -> str:
    from gptjax.layout import default_workdir

    return default_workdir(config or None)


def _write_news(cwd: str) -> None:
    path = os.path.join(cwd, "my_news.jsonl")
    if not os.path.exists(path):
        with open(path, "w") as f:
            for i in range(200):
                f.write(json.dumps({"text": f"The central bank said on day {i} that rates would stay at {i % 5} percent."}) + "\n")


def _hf_dir(path: str) -> None:
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_fixtures import build_hf_dir

    build_hf_dir(path, n_positions=256)  # the fine-tuning recipe trains on 256-token windows


# -- the tests -----------------------------------------------------------------------------------

COMMANDS = readme_commands(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> str:
    cwd = str(tmp_path_factory.mktemp("readme"))
    for name in ("configs", "tools"):
        os.symlink(os.path.join(ROOT, name), os.path.join(cwd, name))
    return cwd


def test_the_readme_has_the_commands_a_user_needs():
    assert len(COMMANDS) >= 10
    assert COMMANDS[0].endswith("python -m gptjax.train") and COMMANDS[1].endswith("python -m pytest")
    for command in COMMANDS:
        runner_for(command)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_readme_command_runs(command, scratch):
    runner_for(command)(command, scratch)


def test_an_unknown_command_has_no_runner():
    with pytest.raises(AssertionError, match="without a runner"):
        runner_for("python -m gptjax.serve --port 80")
    assert readme_commands("```bash\npython -m gptjax.train \\\n  --dry_run\n# note\n```\n") == ["python -m gptjax.train --dry_run"]
