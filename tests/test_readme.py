"""Every command in README.md and docs/*.md is tested: run here, or named with the test that runs it.

A command is a line of a ```bash block, a whole ```python block, or an inline code span that
runs something with arguments (`pip install ...`, `python -m gptjax.train --config ...`).
Each is in exactly one of three tables:

- RUN: run by this file, in document order, in one scratch directory (with `configs/` and
  `tools/` linked in), as a user following the README would, in a shell without this suite's
  8 simulated devices; shortened where it would take long. The quick start trains a few steps
  and then runs the sample line it printed; other training commands run with `--dry_run`
  (config file, overrides, mesh and devices resolved, nothing trained: the quick start runs the
  training loop); the tools run on their smoke-test shapes.
- COVERED: a test elsewhere in tests/ that runs the same code path ("tests/FILE.py::test_name");
  the name must be a `def test_...` in that file.
- NOT_RUN: what needs downloads, installs or cloud hardware, by pattern, with the reason and
  the tests that cover its parts; what can be checked of it here is checked (the pip extras
  exist, the downloaded files are the ones gptjax reads).

A command in no table, or in two, fails the test, so a new README or docs command cannot go
untested; so does a table entry for a command that no document has any more. Every training
or AOT command, whichever table it is in, must name config files that exist and config fields
that take its values.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable

import pytest
from conftest import FAST_COMPILE, FAST_COMPILE_DEFAULT_EMITTERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]

# The two commands a newcomer needs, exactly as the README's quick start gives them.
QUICK_START = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m gptjax.train"
TEST_SUITE = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest'
INSTALL = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e (\S+) && (.+)$")

# A short run of the quick start's training: later overrides win over the command's own. A given
# MFU peak: no matmul timed at the start (the shared run of tests/conftest.py times one).
FAST_TRAIN = (
    " --config.train.steps=2 --config.train.eval_every=2 --config.train.eval_batches=1"
    " --config.train.checkpoint_every=2 --config.train.log_every=1 --config.optim.warmup_steps=0"
    " --config.train.batch_size=8 --config.tokenizer.max_chars=1000000 --config.train.peak_tflops=1"
)


# -- the commands of the documents -------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", flags=re.S | re.M)
# An inline span that runs something with arguments; a bare `python -m gptjax.train` is a name.
INLINE = re.compile(r"`((?:pip install|hf download|gcloud|tensorboard) [^`]+"
                    r"|(?:[A-Z_]+=\S+ )*python3? (?:-m \S+|\S+\.py) -[^`]*)`")


def doc_commands(text: str) -> list[str]:
    """The commands of a Markdown text, in order: ```bash lines (a trailing backslash continues a
    line; comments skipped), ```python blocks (one command each, lines with whitespace collapsed)
    and inline command spans outside the blocks."""
    found: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = " ".join(line.split())
                if line and not line.startswith("#"):
                    found.append((block.start(), line))
        elif lang == "python":
            found.append((block.start(), "\n".join(" ".join(l.split()) for l in body.splitlines() if l.strip())))
    outside = FENCE.sub(lambda m: " " * len(m.group(0)), text)
    found += [(m.start(), " ".join(m.group(1).split())) for m in INLINE.finditer(outside)]
    return [command for _, command in sorted(found, key=lambda f: f[0])]


def all_commands() -> list[tuple[str, str]]:
    """(document, command) for README.md and then docs/*.md."""
    out = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            out += [(doc, c) for c in doc_commands(f.read())]
    return out


# -- running commands --------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def shell(command: str, cwd: str, timeout: int = 600, fast_compile: str = FAST_COMPILE) -> Result:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell: one CPU device
    if FAST_COMPILE in os.environ.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = fast_compile  # the suite's compile setting (tests/conftest.py)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(r.returncode, r.stdout, r.stderr)


def ok(r: Result, what: str) -> Result:
    assert r.code == 0, f"{what} exited {r.code}:\n{r.err[-3000:]}\n{r.out[-2000:]}"
    return r


class Scratch:
    """The scratch directory the RUN commands share, and what the quick start left there."""

    def __init__(self, path: str, session: pytest.Session | None = None):
        self.path = path
        self.session = session  # the pytest session running these tests
        self._printed_sample_line: str | None = None
        self.done: dict[str, Result] = {}  # shortened command -> its result, for commands that shorten alike

    def quick_start(self) -> str:
        """Train the default run a few steps, run the sample line it printed, return that line."""
        if self._printed_sample_line is None:
            r = ok(shell("python -m gptjax.train" + FAST_TRAIN, self.path), "python -m gptjax.train")
            assert os.path.isfile(os.path.join(self.path, "runs", "default", "config.json"))
            printed = [line for line in r.out.splitlines() if line.startswith("sample:")]
            assert len(printed) == 1, r.out
            line = printed[0][len("sample:"):].strip()
            s = ok(shell(line, self.path), f"the printed line {line!r}")
            assert len(s.out.strip()) > len("def "), s.out
            assert "tokens/s" in s.err
            self._printed_sample_line = line
        return self._printed_sample_line


def _check_extra(extra: str) -> None:
    """`.` or `".[name]"`: the extra must be in pyproject.toml."""
    if extra == ".":
        return
    name = re.fullmatch(r'"\.\[(\w+)\]"', extra)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert name and re.search(rf"^{name.group(1)} = \[", pyproject, re.M), f"no extra {extra} in pyproject.toml"


def run_install_line(command: str, scratch: Scratch) -> None:
    """The two quick-start lines: the install's extra is checked, the command after it is run
    (training at a tiny size, then the sample line it prints; the suite: collected)."""
    extra, rest = INSTALL.match(command).groups()
    _check_extra(extra)
    if rest == "python -m pytest":
        collected = _collected_by_this_session(scratch.session)
        if collected is None:  # run some other way: collect as the command does
            r = ok(shell("python -m pytest --collect-only", ROOT), rest)
            counts = re.findall(r"^tests/\S+\.py: (\d+)$", r.out, re.M) or re.findall(r"(\d+) tests? collected", r.out)
            collected = sum(map(int, counts))
            assert collected > 100, r.out[-500:]
        assert collected > 100, collected
        return
    assert rest == "python -m gptjax.train", rest
    scratch.quick_start()


def _collected_by_this_session(session: pytest.Session | None) -> int | None:
    """The number of tests this session collected if it is the README's `python -m pytest`
    itself (started in the repository root with no paths, so it collected its testpaths, and
    nothing deselected): its collection, which succeeded since tests run, is what the command
    collects. None for a session started another way (a file named, -k), which must collect
    in a process of its own. (Under pytest-xdist each worker collects the whole suite.)"""
    if session is None:
        return None
    config = session.config
    if (os.path.realpath(config.invocation_params.dir) != os.path.realpath(ROOT)
            or config.args_source != pytest.Config.ArgsSource.TESTPATHS
            or config.option.keyword or config.option.markexpr or config.option.deselect):
        return None
    files = {os.path.relpath(str(item.path), ROOT) for item in session.items}
    in_tests = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    if files != in_tests:  # e.g. --lf: not everything selected
        return None
    return session.testscollected


def run_printed_sample_line(command: str, scratch: Scratch) -> None:
    """The sample line the quick start prints: the README gives it as printed, and it was run."""
    assert scratch.quick_start() == command, "the README's sample line is not what training prints"


def run_dry(command: str, scratch: Scratch) -> None:
    """A training command with --dry_run (appended if it has none): it resolves and prints the
    run, writes nothing. Local stand-ins for the files it names (a tiny GPT-2 directory, news)."""
    if "hf:gpt2" in command:
        _hf_dir(os.path.join(scratch.path, "gpt2"))
    if "my_news.jsonl" in command:
        _write_news(scratch.path)
    if "--dry_run" not in shlex.split(command):
        command += " --dry_run"
    before = set(_walk(scratch.path))
    r = ok(shell(command, scratch.path), command)
    assert "lr" in r.out and len(r.out.splitlines()) > 3, r.out
    created = sorted(p for p in set(_walk(scratch.path)) - before if p.startswith("runs"))
    assert not created, f"--dry_run wrote {created}"


def _bench_sample_run(shortened: str, scratch: Scratch) -> Result:
    """The result of a shortened sampling benchmark command, run once for the commands that
    shorten to it."""
    if shortened not in scratch.done:
        scratch.done[shortened] = ok(shell(shortened, ROOT), shortened)
    return scratch.done[shortened]


def run_bench_sample(command: str, scratch: Scratch) -> None:
    """The sampling benchmark on the default shape, batch 1, once, without transformers. With
    the model's own key/value heads (--kv_heads 0, the default) and with one, as the grouped-
    query command below is shortened: its kv_heads 0 rows are this command's rows, so the
    commands of docs/benchmarks.md share one run."""
    shortened = re.sub(r"--shapes \S+", "--shapes default", command)
    shortened = re.sub(r"--batches \S+", "--batches 1", shortened) + " --kv_heads 0,1 --no_hf --repeats 1"
    r = _bench_sample_run(shortened, scratch)
    assert re.search(r"^default +1 +16 +64 \|", r.out, re.M), r.out[-2000:]  # shape, batch, prompt, new tokens


def run_bench_kv_heads(command: str, scratch: Scratch) -> None:
    """The sampling benchmark with fewer key/value heads, on the default shape (4 heads), batch 1,
    once, for the full and the fewest heads of the command's list: a row per KV-head count, whose
    KV cache bytes per step fall with the heads."""
    shortened = re.sub(r"--shapes \S+", "--shapes default", command)
    shortened = re.sub(r"--batches \S+", "--batches 1", shortened)
    shortened = re.sub(r"--kv_heads \S+", "--kv_heads 0,1", shortened) + " --repeats 1"
    r = _bench_sample_run(shortened, scratch)
    kv_mb = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(default\S*) +1 +16 +64 \|.*\| +([\d.]+) *$", r.out, re.M)}
    assert {"default", "default/kv1"} <= set(kv_mb), r.out[-2000:]
    assert kv_mb["default/kv1"] == pytest.approx(kv_mb["default"] / 4, abs=0.006), kv_mb  # printed to 0.01 MB


def run_guard_ab(command: str, scratch: Scratch) -> None:
    """The divergence guard's A/B on the benchmark's smoke-test shape (it fails if the steps with
    and without the guard reach different parameters, bit for bit: XLA's default fusion emitters)."""
    r = ok(shell(command + " --quick", ROOT, fast_compile=FAST_COMPILE_DEFAULT_EMITTERS), command)
    assert "guard cost" in r.out, r.out[-2000:]


# -- the tables ---------------------------------------------------------------------------------

RUN: dict[str, Callable[[str, Scratch], None]] = {
    QUICK_START: run_install_line,
    TEST_SUITE: run_install_line,
    'python -m gptjax.sample --workdir runs/default --prompt "def " --max_new_tokens 500': run_printed_sample_line,
    "python -m gptjax.train --config configs/tiny_shakespeare.py --config.train.steps=500": run_dry,
    "python -m gptjax.train --config configs/gpt2_124m.py --dry_run --config.optim.lr=3e-4": run_dry,
    "python -m gptjax.train --workdir runs/decay --dry_run --config.optim.layer_decay=0.8": run_dry,
    "python -m gptjax.train --config configs/gpt2_finetune_news.py --config.init_from=hf:gpt2"
    " --config.data.source=files:my_news.jsonl --dry_run": run_dry,
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.train --workdir runs/mesh"
    " --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2": run_dry,
    "python tools/bench_sample.py --shapes default,124m --batches 1,8": run_bench_sample,
    "python tools/bench_sample.py --shapes 124m --batches 1,8": run_bench_sample,
    "python tools/bench_train.py --shapes default --guard_ab": run_guard_ab,
    "python tools/bench_sample.py --shapes 124m --batches 1,8 --kv_heads 0,4,1 --no_hf": run_bench_kv_heads,
}

_SAMPLE_CLI = "tests/test_sample_cli.py::test_cli_prints_samples_and_speed"
_NEWS = "tests/test_finetune.py::test_news_recipe_end_to_end"
_CONVERT = "tests/test_hf.py::test_cli_import_then_export"
_BENCH_TABLE = "tests/test_bench_tools.py::test_bench_quick_prints_the_table"
# bfloat16 and remat: the paired timing runs the step in bfloat16 with remat, and the footer
# that names both is checked on its own
_BENCH_BF16 = ("tests/test_bench_tools.py::test_paired_prints_each_references_ratio_from_one_process",
               "tests/test_bench_tools.py::test_bench_table_footer_names_bfloat16_and_remat")
_AOT_CLI = "tests/test_aot.py::test_oversized_batch_is_reported_with_the_micro_batch_that_fits"
_EVAL_OWN = "tests/test_eval.py::test_the_runs_own_source_gives_the_val_loss_training_logged"
_EVAL_TASKS = "tests/test_eval_train.py::test_eval_tasks_are_logged_per_task_and_resume_with_the_same_values"
_COMPARE = ("tests/test_compare_recipes.py::"
            "test_the_tool_trains_the_modern_recipe_against_a_gpt2_run_and_writes_table_plot_summary")

COVERED: dict[str, str | tuple[str, ...]] = {  # command -> the test (or tests) covering it
    # README.md
    'python -m gptjax.sample --workdir runs/default --prompt "def " --num_samples 3 --max_new_tokens 200'
    " --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0": _SAMPLE_CLI,
    "python -m gptjax.sample --workdir runs/default --prompt_file prompt.txt --temperature 0": _SAMPLE_CLI,
    'import gptjax\nmodel = gptjax.load("runs/default") # a workdir or a checkpoint directory\n'
    'model.generate(["def ", "import "], max_new_tokens=100, temperature=0.8, top_k=50, top_p=0.95, seed=0)':
        "tests/test_sample_cli.py::test_load_workdir_and_checkpoint_generate",
    "python -m gptjax.train --config configs/gpt2_finetune_news.py --config.init_from=hf:gpt2"
    " --config.data.source=files:my_news.jsonl": _NEWS,
    'python -m gptjax.sample --workdir runs/gpt2_finetune_news --prompt "The central bank said" --num_samples 3'
    " --max_new_tokens 100 --temperature 0.8 --top_k 50 --top_p 0.95": _NEWS,
    "python tools/convert_hf.py export --workdir runs/gpt2_finetune_news --out news-gpt2": _CONVERT,
    "python tools/convert_hf.py import --hf_dir gpt2 --out runs/gpt2": _CONVERT,
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:4x4 --config.train.grad_accum=4":
        "tests/test_aot.py::test_the_124m_recipe_on_v5e_2x2_holds_12_bytes_per_parameter_per_fsdp_chip_and_eval_no_more",
    # docs/benchmarks.md
    "python tools/bench_train.py --shapes nanogpt --check 5":
        "tests/test_bench_tools.py::test_the_nanogpt_reference_computes_what_gptjax_computes",
    "python tools/bench_train.py --shapes nanogpt,default": _BENCH_TABLE,
    "python tools/bench_train.py --shapes nanogpt,default --paired 30 --steps 20":
        "tests/test_bench_tools.py::test_paired_prints_each_references_ratio_from_one_process",
    "python tools/bench_train.py --shapes gpt2_124m --devices 1": _BENCH_TABLE,
    "python tools/bench_train.py --shapes gpt2_124m --steps 5 --warmup 2 --remat": _BENCH_BF16,
    "python tools/bench_train.py --shapes gpt2_124m --steps 5 --warmup 2 --dtype bfloat16": _BENCH_BF16,
    "python tools/bench_train.py --shapes gpt2_124m --steps 5 --warmup 2 --dtype bfloat16 --remat": _BENCH_BF16,
    "python tools/bench_train.py --shapes nanogpt,default --option_ab xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
    " --steps 12 --warmup 3": "tests/test_bench_tools.py::test_option_ab_times_the_step_with_and_without_an_xla_option",
    'python -m gptjax.sample --workdir runs/default --prompt "def " --max_new_tokens 100':
        "tests/test_sample_cli.py::test_a_second_cli_run_loads_the_sampler_without_compiling",
    "python tools/compare_trainer.py": "tests/test_sft.py::test_same_completion_losses_as_transformers_trainer",
    "python tools/bench_gpu.py": "tests/test_bench_gpu.py::test_bench_gpu_tiny_smoke_run",
    # docs/lm_eval.md
    "python -m gptjax.lm_eval --model gptjax --model_args workdir=runs/default --tasks hellaswag,wikitext --batch_size 16":
        "tests/test_lm_eval.py::test_cli_registers_the_model",
    'import gptjax.lm_eval\nimport lm_eval\nresults = lm_eval.simple_evaluate(model="gptjax", model_args="workdir=runs/default",'
    ' tasks=["hellaswag"])': "tests/test_lm_eval.py::test_multiple_choice_matches_hf_per_example",
    "python -m gptjax.train --config.wandb.enabled=True --config.wandb.project=my-project":
        "tests/test_wandb.py::test_offline_run_holds_config_and_every_step_across_a_resume",
    # docs/data.md
    "python tools/bench_prepare.py": "tests/test_bench_prepare.py::test_bench_prepare_prints_rates_speedup_and_projection",
    "python tools/bench_prepare.py --mb 16 --repeats 1":
        "tests/test_bench_prepare.py::test_bench_prepare_prints_rates_speedup_and_projection",
    # docs/recipes.md
    "python tools/compare_recipes.py --workdir runs/compare_default --png docs/recipes_default.png": _COMPARE,
    "python tools/compare_recipes.py --corpus input.txt --workdir runs/compare_text --png docs/recipes_text.png":
        _COMPARE,
    "python -m gptjax.aot --config configs/modern_124m.py --topology v5e:2x2 --programs train": _AOT_CLI,
    # docs/reliability.md
    "python tools/fault_inject.py --trials 20":
        "tests/test_fault_inject.py::test_killed_runs_end_with_bitwise_identical_checkpoints",
    # docs/tpu.md
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:2x2 --config.train.grad_accum=8 --programs train"
    " --top_ops 10": "tests/test_aot_counts.py::test_top_ops_lists_the_largest_with_their_shares",
    "python -m gptjax.aot --config configs/gpt2_large.py --topology v5e:1x1 --programs train": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_xl.py --topology v5e:2x2 --programs train": _AOT_CLI,
    # docs/tpu.md: the recipes as configured (issue 22's table)
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:2x2 --programs train --top_ops 12": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v6e:2x2 --programs train --top_ops 12": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:4x4 --programs train": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_124m.py --topology v5p:2x2x1 --programs train": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_medium.py --topology v5e:1x1 --programs train": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_large.py --topology v5e:2x2 --programs train": _AOT_CLI,
    "python -m gptjax.aot --config configs/gpt2_xl.py --topology v5p:2x2x1 --programs train": _AOT_CLI,
    # README.md and docs/evaluation.md
    "python -m gptjax.eval --workdir runs/default": _EVAL_OWN,
    "python -m gptjax.eval --workdir runs/default --eval_batches 0":
        "tests/test_eval.py::test_bits_per_byte_matches_a_hand_computation",
    'python -m gptjax.eval --workdir runs/x/checkpoints/500 --source "files:data/wiki/*.txt"': _EVAL_TASKS,
    "python -m gptjax.eval --workdir runs/gpt2_124m --hellaswag data/hellaswag_val.jsonl": _EVAL_TASKS,
    "python -m gptjax.train --config configs/gpt2_124m.py --config.eval.max_items=2000": _EVAL_TASKS,
    'python -m gptjax.eval --workdir runs/default --source "files:wiki.test.txt" --rolling':
        "tests/test_eval.py::test_rolling_scores_each_document_whole_from_end_of_text",
    # docs/lm_eval.md
    "python -m gptjax.eval --rolling": "tests/test_lm_eval.py::test_gptjax_eval_bits_per_byte_agrees_with_the_rolling_task",
    "python -m gptjax.plot runs/a runs/b -o curves.png":
        "tests/test_eval_plot.py::test_plot_writes_a_png_of_every_run_and_metric",
}


@dataclasses.dataclass(frozen=True)
class NotRun:
    pattern: str
    reason: str
    parts_tested_by: tuple[str, ...] = ()


NOT_RUN = [
    NotRun(r"^pip install ", "installs packages: the suite runs in the installed environment; an extra it names "
           "must be in pyproject.toml (test_the_commands_not_run_name_what_exists)"),
    NotRun(r"^hf download ", "downloads from the Hugging Face Hub, and tests have no network; they build a tiny "
           "GPT-2 directory with the same files (tests/hf_fixtures.py), the files named are the ones gptjax reads",
           (_NEWS, _CONVERT)),
    NotRun(r"^curl -L --create-dirs -o data/hellaswag_val\.jsonl ", "downloads HellaSwag's validation set, and "
           "tests have no network; they score HellaSwag-format files they write",
           ("tests/test_eval_hellaswag.py::test_acc_and_acc_norm_match_llm_c_scored_with_transformers",)),
    NotRun(r"^(gcloud compute tpus |tensorboard --logdir gs://)", "needs a Google Cloud project and a TPU VM; "
           "a run in a bucket (against a local storage emulator) and hosts joined by jax.distributed are tested",
           ("tests/test_gcs.py::test_a_run_in_a_bucket_trains_resumes_and_samples",
            "tests/test_multihost.py::test_two_hosts_train_as_one_and_their_checkpoint_resumes_anywhere")),
]


def tables_of(command: str) -> list[str]:
    """The tables a command is in."""
    return ([name for name, table in (("RUN", RUN), ("COVERED", COVERED)) if command in table]
            + [f"NOT_RUN {n.pattern}" for n in NOT_RUN if re.search(n.pattern, command)])


# -- helpers -------------------------------------------------------------------------------------


def _walk(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("configs", "tools")]
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return out


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


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    full = os.path.join(ROOT, path)
    if not (path.startswith("tests/") and name.startswith("test_") and os.path.isfile(full)):
        return False
    with open(full, encoding="utf-8") as f:
        return re.search(rf"^\s*def {re.escape(name)}\(", f.read(), re.M) is not None


# -- the tests -----------------------------------------------------------------------------------

COMMANDS = all_commands()
RUN_COMMANDS = [c for _, c in COMMANDS if c in RUN]


def test_the_readme_starts_with_the_two_newcomer_commands():
    readme = [c for doc, c in COMMANDS if doc == "README.md"]
    assert readme[:2] == [QUICK_START, TEST_SUITE]
    assert RUN[QUICK_START] is run_install_line and RUN[TEST_SUITE] is run_install_line


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{doc}-{i:02d}" for i, (doc, _) in enumerate(COMMANDS)])
def test_each_documented_command_is_run_covered_or_excused(doc, command):
    tables = tables_of(command)
    assert len(tables) == 1, f"{doc}: {command!r} is in {tables or 'no table'}: add it to one of RUN, COVERED, NOT_RUN"


def test_every_table_entry_is_still_documented():
    documented = {c for _, c in COMMANDS}
    problems = [f"{command!r} is in a table of tests/test_readme.py but in no document"
                for command in [*RUN, *COVERED] if command not in documented]
    problems += [f"NOT_RUN {n.pattern!r} matches no documented command"
                 for n in NOT_RUN if not any(re.search(n.pattern, c) for c in documented)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(COVERED), ids=[f"{i:02d}" for i in range(len(COVERED))])
def test_a_covered_command_names_a_test_that_exists(command):
    tests = COVERED[command] if isinstance(COVERED[command], tuple) else (COVERED[command],)
    missing = [t for t in tests if not _test_exists(t)]
    assert not missing, f"{command!r} is mapped to {missing!r}, which does not exist"


def test_the_tests_named_for_the_commands_not_run_exist():
    missing = sorted({t for n in NOT_RUN for t in n.parts_tested_by if not _test_exists(t)})
    assert not missing, f"no such test: {missing}"


def test_commands_name_real_configs_and_fields():
    """Every `python -m gptjax.train|aot` command, run here or not (also those run on a TPU VM by
    gcloud): its config file exists and its --config.* overrides name fields that take the
    values (cheap: no run)."""
    from gptjax import config as config_lib

    commands = []
    for _, command in COMMANDS:
        if "\n" in command:
            continue  # a python block
        args = shlex.split(command)
        inner = [a[len("--command="):] for a in args if a.startswith("--command=")]  # a command run on a TPU VM
        commands += [part.strip() for part in inner[0].split("&&")] if inner else [command]
    checked = 0
    for command in commands:
        args = shlex.split(command)
        while args and re.match(r"^[A-Z_]+=", args[0]):
            args = args[1:]
        if args[:3] not in (["python", "-m", "gptjax.train"], ["python", "-m", "gptjax.aot"]):
            continue
        config_path = args[args.index("--config") + 1] if "--config" in args else None
        if config_path:
            assert os.path.isfile(os.path.join(ROOT, config_path)), f"{command}: no {config_path}"
        overrides = [a for a in args if a.startswith("--config.")]
        config = config_lib.load_config(os.path.join(ROOT, config_path) if config_path else None)
        config_lib.apply_overrides(config, config_lib.parse_overrides(overrides))
        checked += 1
    assert checked >= 10


def test_the_commands_not_run_name_what_exists():
    for _, command in COMMANDS:
        if re.match(r"^pip install -e ", command):
            _check_extra(command.split()[3])
        if command.startswith("hf download "):
            args = shlex.split(command)
            names = set(args[3:args.index("--local-dir")])
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, f"gptjax reads these; got {names}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, request) -> Scratch:
    cwd = str(tmp_path_factory.mktemp("readme"))
    for name in ("configs", "tools"):
        os.symlink(os.path.join(ROOT, name), os.path.join(cwd, name))
    return Scratch(cwd, request.session)


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=[f"{i:02d}" for i in range(len(RUN_COMMANDS))])
def test_command_runs(command, scratch):
    RUN[command](command, scratch)


def test_a_command_in_no_table_is_found():
    text = ("Run `pip install -e .` or `python -m gptjax.train` (a name).\n```bash\npython -m gptjax.serve \\\n"
            "  --port 80\n# note\n```\n```python\nimport gptjax\nx  =  1\n```\n```text\npython -m no\n```\n")
    assert doc_commands(text) == ["pip install -e .", "python -m gptjax.serve --port 80", "import gptjax\nx = 1"]
    assert tables_of("python -m gptjax.serve --port 80") == []
    assert tables_of(QUICK_START) == ["RUN"] and tables_of("pip install -e .") == ["NOT_RUN ^pip install "]
