"""lm-evaluation-harness on gptjax runs (`gptjax.lm_eval`) against lm-eval's own `hf` model.

A tiny random Hugging Face GPT-2 (tests/hf_fixtures.py) and its gptjax import are evaluated by
lm-eval on local tasks this file writes (a multiple-choice task, a wikitext-style rolling
log-likelihood task and a greedy generation task; jsonl files read by the `json` dataset
builder, nothing downloaded): every example's log-likelihoods, greedy flags and generated
answers must match the `hf` model's.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_hf  # noqa: E402
from hf_fixtures import build_hf_dir  # noqa: E402

import gptjax.lm_eval  # noqa: E402,F401  registers "gptjax"

BLOCK = 32
PAGES = [
    "The quick brown fox jumps over the lazy dog. " * 6,  # several windows of 32 tokens
    "def f(x):\n    return x ** 2  # code",
    "Ünïcödé: naïve café, 日本語のテキスト",
    "short",
]
MC = [
    {"context": "Hello, world! The quick brown", "endings": [" fox", " dog", " cat jumps"], "label": 0},
    {"context": "line one\nline two ", "endings": ["after", "blank lines", "windows"], "label": 1},
    {"context": "numbers 1234567890 3.14159 " * 4, "endings": ["-42", "1e-5", "@#$%"], "label": 2},  # cut to the window
    {"context": "def f(x):\n    return", "endings": [" x ** 2", " x"], "label": 0},
]
GEN = [
    {"prompt": "Hello, world! The", "answer": "quick"},
    {"prompt": "def f(x):\n", "answer": "return"},
    {"prompt": "emoji and a family and flags " * 3, "answer": "x"},
    {"prompt": "'s 't 're", "answer": "'ve"},
]


def _write_task(directory: str, name: str, rows: list[dict], body: str, cache: str) -> None:
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
        f.write(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}"
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir = build_hf_dir(str(root / "hf"), vocab_size=300, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2)
    workdir = str(root / "run")
    convert_hf.import_hf(hf_dir, workdir)
    tasks = str(root / "tasks")
    os.makedirs(tasks)
    cache = str(root / "datasets")
    _write_task(tasks, "tiny_mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                'doc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n'
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", cache)
    _write_task(tasks, "tiny_rolling", [{"page": p} for p in PAGES], 'output_type: loglikelihood_rolling\n'
                'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
                cache)
    _write_task(tasks, "tiny_gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", ".", "in"]\n  max_gen_toks: 8\n'
                "  do_sample: false\nmetric_list:\n  - metric: exact_match\n", cache)
    return {"hf_dir": hf_dir, "workdir": workdir, "tasks": tasks}


def _evaluate(model: str, model_args: str, tasks: str, names: list[str], batch_size: int = 4) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=names, batch_size=batch_size, log_samples=True,
        task_manager=TaskManager(include_path=tasks, include_defaults=False), bootstrap_iters=0,
    )


@pytest.fixture(scope="module")
def results(setup: dict) -> dict:
    names = ["tiny_mc", "tiny_rolling", "tiny_gen"]
    hf = _evaluate("hf", f"pretrained={setup['hf_dir']},dtype=float32,device=cpu", setup["tasks"], names)
    ours = _evaluate("gptjax", f"workdir={setup['workdir']}", setup["tasks"], names)
    return {"hf": hf, "gptjax": ours}


def _responses(result: dict, task: str) -> list:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_hf_per_example(results: dict) -> None:
    hf, ours = _responses(results["hf"], "tiny_mc"), _responses(results["gptjax"], "tiny_mc")
    assert len(hf) == len(ours) == len(MC)
    for hf_doc, our_doc in zip(hf, ours):
        assert len(hf_doc) == len(our_doc)
        for [(hf_ll, hf_greedy)], [(our_ll, our_greedy)] in zip(hf_doc, our_doc):
            assert our_ll == pytest.approx(hf_ll, abs=1e-4)
            assert our_greedy == hf_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert results["gptjax"]["results"]["tiny_mc"][metric] == results["hf"]["results"]["tiny_mc"][metric]


def test_rolling_loglikelihood_matches_hf_per_example(results: dict) -> None:
    hf, ours = _responses(results["hf"], "tiny_rolling"), _responses(results["gptjax"], "tiny_rolling")
    assert [r[0][0] for r in ours] == pytest.approx([r[0][0] for r in hf], abs=1e-4)
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert results["gptjax"]["results"]["tiny_rolling"][metric] == pytest.approx(
            results["hf"]["results"]["tiny_rolling"][metric], rel=1e-5)


def test_greedy_generation_matches_hf_per_example(results: dict) -> None:
    hf, ours = _responses(results["hf"], "tiny_gen"), _responses(results["gptjax"], "tiny_gen")
    assert ours == hf
    assert any(r[0][0] for r in ours)  # something was generated
    # The task's stop strings include "in", which the random model writes: some rows are cut at it.


def test_a_model_split_over_a_mesh_scores_as_on_one_device(setup: dict, results: dict) -> None:
    """tensor=2 (data takes the other devices): the parameters split as training splits them, the
    rows over data; the multiple-choice log-likelihoods are the one-device ones."""
    from lm_eval.api.instance import Instance

    lm = lm_eval.api.registry.get_model("gptjax")(workdir=setup["workdir"], tensor=2, batch_size=4)
    assert dict(lm.scorer.mesh.shape) == {"data": len(jax.devices()) // 2, "fsdp": 1, "tensor": 2}
    assert len(lm.model.params["wte"]["embedding"].sharding.device_set) == len(jax.devices())
    # lm-eval's multiple-choice requests: (context, target_delimiter " " + choice)
    requests = [Instance("loglikelihood", {}, (d["context"], " " + e), 0) for d in MC for e in d["endings"]]
    ours = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    one_device = [ll for doc in _responses(results["gptjax"], "tiny_mc") for [(ll, _)] in doc]
    assert ours == pytest.approx(one_device, abs=1e-5)


def test_gptjax_eval_bits_per_byte_agrees_with_the_rolling_task(setup: dict, results: dict, tmp_path) -> None:
    """`python -m gptjax.eval --rolling` on the same texts (one file each) gives lm-eval's bits_per_byte."""
    from gptjax.evaluate.cli import evaluate_run

    for i, page in enumerate(PAGES):
        (tmp_path / f"page{i}.txt").write_text(page, encoding="utf-8")
    ours = evaluate_run(setup["workdir"], source=f"files:{tmp_path}/*.txt", rolling=True, batch_size=8)
    assert ours["documents"] == len(PAGES)
    for result in (results["gptjax"], results["hf"]):
        assert ours["rolling_bpb"] == pytest.approx(result["results"]["tiny_rolling"]["bits_per_byte,none"], abs=1e-4)


def test_cli_registers_the_model(setup: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`python -m gptjax.lm_eval` is lm-eval's command with "gptjax" known; a missing workdir or an
    unknown model argument is one line, status 2.

    lm-eval's command indexes its thousands of built-in tasks first (tens of seconds here): the
    test shows it only the local ones.
    """
    import lm_eval.tasks

    from gptjax.lm_eval.__main__ import main

    local_only = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *a, **k: local_only(self, *a, **{**k, "include_defaults": False}))
    args = ["--model", "gptjax", "--include_path", setup["tasks"], "--tasks", "tiny_mc", "--batch_size", "4"]
    main([*args, "--model_args", f"workdir={setup['workdir']}"])
    out = capsys.readouterr().out
    assert "tiny_mc" in out and "acc_norm" in out
    for model_args, message in (("seed=1", "workdir="), (f"workdir={setup['workdir']},temprature=0", "temprature")):
        with pytest.raises(SystemExit) as e:
            main([*args, "--model_args", model_args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1]
