"""`gptjax.load` and `python -m gptjax.sample` on a real (tiny) run, trained on an 8-device mesh."""

import inspect
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import gptjax
from gptjax import checkpoint, checkpoint_read, sample, sampling
from gptjax.layout import find_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(trained_mesh_run):
    """The shared run's config (`trained_run`: 20 steps, checkpoints 10 and 20) trained again
    from its tokenizer on a mesh of 8 CPU devices (`trained_mesh_run`: data, fsdp and tensor 2
    each); the tests load it on one."""
    return trained_mesh_run


def test_load_workdir_and_checkpoint_generate(workdir):
    model = gptjax.load(workdir)
    assert model.model_config.n_layer == 2 and model.tokenizer.vocab_size == model.model_config.vocab_size
    leaf = jax.tree_util.tree_leaves(model.params)[0]
    assert len(leaf.sharding.device_set) == 1
    texts = model.generate(["def ", "return"], max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.generate(["def ", "return"], max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=1) == texts
    ids = model.generate_tokens([model.tokenizer.encode("def ")], max_new_tokens=10, temperature=0)
    assert model.generate("def ", max_new_tokens=10, temperature=0) == [model.tokenizer.decode(ids[0])]
    step10 = gptjax.load(os.path.join(workdir, "checkpoints", "10"))
    assert step10.generate("def ", max_new_tokens=5, temperature=0)[0] is not None


def test_gptjax_load_takes_what_sampling_load_takes(workdir):
    assert inspect.signature(gptjax.load).parameters.keys() == inspect.signature(sampling.load).parameters.keys()
    device = jax.devices()[3]
    model = gptjax.load(workdir, device=device)
    assert {d for x in jax.tree_util.tree_leaves(model.params) for d in x.devices()} == {device}
    assert model.generate("def ", max_new_tokens=5, temperature=0) == gptjax.load(workdir).generate("def ", max_new_tokens=5, temperature=0)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_prints_samples_and_speed(workdir, capsys, tmp_path):
    args = ["--workdir", workdir, "--prompt", "def ", "--num_samples", "3", "--max_new_tokens", "30",
            "--temperature", "0.8", "--top_k", "50", "--top_p", "0.95", "--seed", "0"]
    sample.main(args)
    out = capsys.readouterr()
    assert out.out.count("---------- sample") == 3
    assert "tokens/s" in out.err
    sample.main(args)
    assert capsys.readouterr().out == out.out  # same seed, same text
    (tmp_path / "p.txt").write_text("def f1_2(alpha):\n")
    sample.main(["--workdir", workdir, "--prompt_file", str(tmp_path / "p.txt"), "--max_new_tokens", "10", "--temperature", "0"])
    single = capsys.readouterr().out
    assert single.startswith("def f1_2(alpha):\n")
    model = gptjax.load(workdir)
    assert single.rstrip("\n") == "def f1_2(alpha):\n" + model.generate("def f1_2(alpha):\n", max_new_tokens=10, temperature=0)[0]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top_k", "-1"], "top_k"),
        (["--top_k", "100000"], "top_k"),
        (["--top_p", "0"], "top_p"),
        (["--top_p", "1.5"], "top_p"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--num_samples", "0"], "num_samples"),
        (["--prompt", "x " * 200, "--max_new_tokens", "10"], "truncate"),
        (["--prompt_file", "/nonexistent/prompt.txt"], "prompt_file"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(workdir, capsys, extra, message):
    code, out, err = run_cli(["--workdir", workdir, "--max_new_tokens", "5", *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_truncate_prompt_cuts_from_the_left(workdir, capsys):
    sample.main(["--workdir", workdir, "--prompt", "x " * 200, "--max_new_tokens", "10", "--truncate_prompt", "--temperature", "0"])
    assert "tokens/s" in capsys.readouterr().err


def test_cli_refuses_a_path_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(["--workdir", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "not a gptjax run" in err


def test_cli_default_max_new_tokens_runs_past_the_window(workdir, capsys):
    """The CLI's default --max_new_tokens (200) on a 32-token model: the context is cropped."""
    sample.main(["--workdir", workdir, "--prompt", "def ", "--temperature", "0", "--stop_tokens", ""])
    out = capsys.readouterr()
    assert out.err.startswith("200 new tokens in ")
    model = gptjax.load(workdir)
    assert out.out == "def " + model.generate("def ", max_new_tokens=200, temperature=0, stop_tokens=[])[0] + "\n"


def test_cli_streams_every_row(workdir, capsys, monkeypatch):
    """With several samples, text is printed while decoding goes on, and all rows come out whole."""
    printed_before_yield = []
    real_stream = sampling.LoadedModel.stream

    def spy(self, *args, **kwargs):
        def wrapped():
            for item in real_stream(self, *args, **kwargs):
                printed_before_yield.append(capsys.readouterr().out)
                yield item

        return wrapped()

    monkeypatch.setattr(sampling.LoadedModel, "stream", spy)
    args = ["--workdir", workdir, "--prompt", "def ", "--num_samples", "3", "--max_new_tokens", "40",
            "--chunk", "4", "--temperature", "0.8", "--stop_tokens", "", "--seed", "2"]
    sample.main(args)
    printed = printed_before_yield + [capsys.readouterr().out]
    assert len(printed) == 12  # the first token, then 10 chunks of 4, then the end
    assert printed[0] == "---------- sample 0 ----------\ndef "  # before any token
    # Row 0's text arrives chunk by chunk while the batch is decoded.
    assert sum(1 for p in printed[1:-1] if p) >= 5
    texts = gptjax.load(workdir).generate(["def "] * 3, max_new_tokens=40, temperature=0.8, stop_tokens=[], seed=2)
    assert "".join(printed) == "".join(f"---------- sample {i} ----------\ndef {t}\n" for i, t in enumerate(texts))


def test_print_rows_moves_to_the_next_row_when_one_ends():
    """Row 0 stops at the second chunk: row 1's text so far follows at once and then streams."""

    def step(pieces, stopped, finished=False):
        return pieces, SimpleNamespace(stopped=stopped, finished=finished)

    chunks = [
        step(["a", "x", "p"], [False, False, False]),
        step(["b", "y", "q"], [True, False, False]),
        step(["", "z", "r"], [True, False, False]),
        step(["", "w", "s"], [True, True, True], finished=True),
    ]
    out = io.StringIO()
    seen = []

    def stream():
        for c in chunks:
            yield c
            seen.append(out.getvalue())

    sample.print_rows(stream(), ">", 3, out)
    h = lambda i: f"---------- sample {i} ----------\n>"
    assert seen[0] == h(0) + "a"
    assert seen[1] == h(0) + "ab\n" + h(1) + "xy"
    assert seen[2] == h(0) + "ab\n" + h(1) + "xyz"
    assert out.getvalue() == h(0) + "ab\n" + h(1) + "xyzw\n" + h(2) + "pqrs\n"
    single = io.StringIO()
    sample.print_rows(iter([step(["a"], [False]), step(["b"], [False], finished=True)]), ">", 1, single)
    assert single.getvalue() == ">ab\n"


def _sample_cli(workdir, cache, extra_env=None, imports=None):
    """One `python -m gptjax.sample` run with its own caches; (stdout, compile log lines).
    With `imports` (a set), the names of the modules the run imported are added to it, and
    those of their top-level packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_LOG_COMPILES="1", **(extra_env or {}))
    if imports is not None:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    cmd = [sys.executable, "-m", "gptjax.sample", "--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "24", "--top_k", "20"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if imports is not None:
        lines = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
        assert lines, "PYTHONPROFILEIMPORTTIME listed no imports"
        names = [line.rsplit("|", 1)[1].strip() for line in lines]
        imports.update(names)
        imports.update(name.split(".")[0] for name in names)
    return r.stdout, [line for line in r.stderr.splitlines() if "Compiling jit(" in line]


def test_a_second_cli_run_loads_the_sampler_without_compiling(workdir, tmp_path):
    """The sampler stores only programs it compiled itself: an executable JAX loaded from its
    persistent cache serializes without some kernels (a later process fails with "Function ...
    not found"). So after a run that filled JAX's cache with the sampler's programs, the first
    CLI run compiles them afresh and stores them; the second traces and compiles nothing,
    imports neither Flax nor orbax (nor what only training a tokenizer or reading a GPT-2 one
    needs), and prints the same text; a damaged stored program is compiled again."""
    cache = tmp_path / "xla"
    script = (
        "import sys, jax; from gptjax import sample; from gptjax.sampling import programs;"
        "programs.call = lambda name, lower, static, args: lower().compile()(*args);"
        "sample.main(sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-c", script, "--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "24", "--top_k", "20"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert any(name.startswith("jit_prefill") for name in os.listdir(cache))  # JAX's cache holds the programs

    first_imports: set = set()
    first, compiled = _sample_cli(workdir, cache, imports=first_imports)
    assert any("jit(prefill)" in line for line in compiled) and any("jit(advance)" in line for line in compiled)
    assert {"jax", "flax"} <= first_imports  # the model was traced
    stored = sorted(os.listdir(cache / "gptjax-sampler"))
    for program in ("prefill-", "advance-", "decode_layout-", "row_keys-"):
        assert any(name.startswith(program) for name in stored), (program, stored)
    second_imports: set = set()
    second, compiled = _sample_cli(workdir, cache, imports=second_imports)
    assert compiled == [] and second == first == r.stdout
    assert "jax" in second_imports and "tensorstore" in second_imports
    assert not {"flax", "orbax", "optax", "tokenizers", "sentencepiece.sentencepiece_model_pb2"} & second_imports, sorted(
        second_imports)
    prefill = next(name for name in stored if name.startswith("prefill-"))
    (cache / "gptjax-sampler" / prefill).write_bytes(b"not an executable")
    third, compiled = _sample_cli(workdir, cache)
    assert third == first and len(compiled) == 1 and "jit(prefill)" in compiled[0]


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_parameters_read_from_the_files_equal_what_orbax_restores(workdir):
    """The direct read (tensorstore, no orbax) of checkpoints saved from an 8-device mesh gives
    orbax's tree, dtypes and values bit for bit, at the newest step and at a named one."""
    read = {}
    for name, path in (("newest", workdir), ("10", os.path.join(workdir, "checkpoints", "10"))):
        direct = checkpoint_read.read_direct(path)
        assert direct is not None, path
        config, params = direct
        run_dir, step = find_run(path)
        want_config, want = checkpoint_read.read_run_config(run_dir), checkpoint.restore_params(run_dir, step)
        assert config == want_config
        got, expected = _leaves(params), _leaves(want)
        assert [k for k, _ in got] == [k for k, _ in expected]
        for (key, a), (_, b) in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
        assert len(jax.tree_util.tree_leaves(params)[0].sharding.device_set) == 1
        read[name] = got
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(read["newest"], read["10"]))


def test_a_checkpoint_the_direct_read_cannot_take_is_left_to_orbax(workdir, tmp_path, capsys):
    """Damaged files: the direct read gives up, orbax reports the step in one line and the
    previous checkpoint is used. A layout the reader does not know: it gives up too."""
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    params_dir = os.path.join(copy, "checkpoints", "20", "params")
    for dirpath, _, files in os.walk(params_dir):
        for f in files:
            if f != "_METADATA":
                path = os.path.join(dirpath, f)
                os.truncate(path, os.path.getsize(path) // 2)
    assert checkpoint_read.read_direct(copy) is None
    model = gptjax.load(copy)
    err = capsys.readouterr().err
    assert "checkpoint 20 in" in err and "is unreadable" in err and "trying checkpoint 10" in err, err
    _, step10 = checkpoint_read.load_for_inference(os.path.join(copy, "checkpoints", "10"))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(_leaves(model.params), _leaves(step10)))

    other = str(tmp_path / "other")
    shutil.copytree(workdir, other)
    meta_path = os.path.join(other, "checkpoints", "20", "params", "_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    first = next(iter(meta["tree_metadata"].values()))
    first["value_metadata"]["value_type"] = "scalar"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert checkpoint_read.read_direct(other) is None
    assert checkpoint_read.read_direct(os.path.join(other, "checkpoints", "10")) is not None


def test_the_plugin_scan_sees_only_jax_distributions_while_jax_is_imported(monkeypatch):
    """JAX's import-time ROCm plugin scan reads the metadata of every distribution it is shown;
    `plugin_scan_narrowed` shows it only those named jax..., without reading the others', and
    leaves `importlib.metadata` as it was."""
    import importlib.metadata

    from gptjax.sample import plugin_scan_narrowed

    every = importlib.metadata.distributions
    names = {d.metadata["Name"].lower().replace("-", "_") for d in every()}
    assert {"jax", "jaxlib", "numpy"} <= names
    read = []
    original_read_text = importlib.metadata.PathDistribution.read_text

    def counting_read_text(self, filename):
        read.append((self._path.name, filename))
        return original_read_text(self, filename)

    monkeypatch.setattr(importlib.metadata.PathDistribution, "read_text", counting_read_text)
    with plugin_scan_narrowed():
        shown_names = {d.metadata["Name"].lower().replace("-", "_") for d in importlib.metadata.distributions()}
    assert shown_names == {n for n in names if n.startswith("jax")}
    # Choosing them read no other distribution's files: only the shown ones' metadata was read.
    assert read and all(path.startswith("jax") for path, _ in read), read
    assert importlib.metadata.distributions is every


def test_a_reader_that_stops_reading_ends_a_cli_quietly():
    """`python -m gptjax.sample ... | head`: no traceback when head exits (run_cli, as every CLI uses)."""
    code = ("from gptjax.errors import run_cli\n"
            "def body():\n"
            "    for i in range(200000):\n"
            "        print('line', i)\n"
            "run_cli(body)\n")
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (proc.stdout, proc.stderr, proc.returncode) == ("line 0\n", "", 1)
