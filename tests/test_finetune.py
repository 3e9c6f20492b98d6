"""Fine-tuning a pretrained GPT-2 end to end, through the real trainer, offline.

A tiny random GPT-2 is built with transformers in a temporary directory (tests/hf_fixtures.py)
and imported with `--config.init_from=hf:DIR`; the data are made-up news articles and
prompt/completion pairs written here. Shapes are tiny so the file runs in about a minute.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gptjax  # noqa: E402
from gptjax import checkpoint_read  # noqa: E402
from gptjax import config as config_lib  # noqa: E402
from gptjax import data as data_lib  # noqa: E402
from gptjax import hf, optim, sharding, step, train  # noqa: E402
from gptjax.state import param_shapes  # noqa: E402
from gptjax.layout import RunDir  # noqa: E402
from gptjax.loss import cross_entropy  # noqa: E402
from gptjax.model import GPT, GPTConfig  # noqa: E402
from gptjax.tokenizer import load_tokenizer  # noqa: E402
from hf_fixtures import TEXTS, build_hf_dir  # noqa: E402
from test_data import typed_sections  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "gpt2_finetune_news.py")

CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Perth", "Dakar"]
ORGS = ["the central bank", "the city council", "the football club", "the ministry of health",
        "a local startup", "the university", "the port authority", "the weather service"]
VERBS = ["announced", "reported", "denied", "confirmed", "warned", "celebrated"]
THINGS = ["record rainfall", "a new stadium", "higher interest rates", "a vaccine campaign",
          "the bridge repairs", "a quarterly profit", "the night train", "a science prize"]


def _article(rng: random.Random) -> str:
    city, org = rng.choice(CITIES), rng.choice(ORGS)
    sentences = [f"{city.upper()} - {org.capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)} on Monday."]
    for _ in range(rng.randint(3, 6)):
        sentences.append(f"Officials in {city} said {rng.choice(THINGS)} was {rng.choice(VERBS)} "
                         f"by {rng.choice(ORGS)}, up {rng.randint(2, 40)} percent from last year.")
    return " ".join(sentences)


def _pair(rng: random.Random) -> dict[str, str]:
    """Short records (prompt + completion + end-of-text well under one 32-token window)."""
    return {"prompt": f"{rng.choice(CITIES)}?", "completion": f" {rng.choice(VERBS)}."}


def _write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_hf_dir(str(tmp_path_factory.mktemp("hf") / "gpt2-tiny"))


@pytest.fixture(scope="module")
def news(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(0)
    path = str(tmp_path_factory.mktemp("news") / "news.jsonl")
    return _write_jsonl(path, [{"text": _article(rng)} for _ in range(60)])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(1)
    path = str(tmp_path_factory.mktemp("pairs") / "qa.jsonl")
    return _write_jsonl(path, [_pair(rng) for _ in range(300)])


# The recipe with tiny run lengths; dropout off so the first loss can be compared exactly. Which
# documents are held out depends on their paths (temporary directories), so val_fraction is
# large enough that validation always holds a window.
SMALL = [
    "--config.model.dropout=0.0",
    "--config.data.val_fraction=0.1",
    "--config.train.seq_len=32",
    "--config.train.eval_batches=0",
    "--config.train.log_every=1",
    "--config.optim.lr=3e-3",
    "--config.optim.warmup_steps=1",
    "--config.train.peak_tflops=1",  # MFU against a given peak: no matmul timed at each start
]


def _recipe(hf_dir: str, source: str, *extra: str) -> config_lib.ConfigDict:
    """The news recipe with command-line style overrides, as `python -m gptjax.train` builds it."""
    c = config_lib.load_config(RECIPE)
    args = [f"--config.init_from=hf:{hf_dir}", f"--config.data.source={source}", *SMALL, *extra]
    return config_lib.apply_overrides(c, config_lib.parse_overrides(args))


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _flat(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in flat}


def test_news_recipe_end_to_end(hf_dir: str, news: str, tmp_path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """The recipe's CLI, offline: GPT-2 shape and tokenizer from the checkpoint, first loss equal to
    transformers' on the imported weights, the loss falls, and the run samples. (On one device:
    the recipe does not choose its devices, and the tests' 8 simulated ones would make every
    step an 8-way program.)"""
    monkeypatch.setattr(sharding, "default_devices", lambda mesh, micro_batch: (jax.devices()[:1], ""))
    workdir = str(tmp_path / "news_run")
    steps = 12
    train.main([
        "--config", RECIPE, "--workdir", workdir,
        f"--config.init_from=hf:{hf_dir}", f"--config.data.source=files:{news}", *SMALL,
        f"--config.train.steps={steps}", "--config.train.batch_size=16",  # the recipe's grad_accum=2: 8 rows per micro-batch
        "--config.train.eval_every=12", "--config.train.eval_batches=1",
    ])
    out = capsys.readouterr().out
    assert f"done: step {steps}; " in out and "val_loss" in out, out

    fields, hf_params, _ = hf.load_hf_dir(hf_dir)
    saved = checkpoint_read.read_run_config(RunDir.at(workdir))
    assert {k: saved.model[k] for k in fields} == fields  # not the base config's 4 x 128 shape
    assert saved.optim.layer_decay == 0.8 and saved.init_from == f"hf:{hf_dir}"  # the recipe's own settings
    _, params = checkpoint_read.load_for_inference(workdir)
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, hf_params)

    # The run's tokenizer is the checkpoint's GPT-2 BPE: the same ids as transformers'.
    tok = load_tokenizer(RunDir.at(workdir).tokenizer)
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.kind == "gpt2" and tok.eot_id == ref.eos_token_id
    with open(news) as f:
        article = json.loads(f.readline())["text"]
    for text in [article, *TEXTS]:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text

    # The first logged loss is the loss of step 0's batch under the imported weights.
    dataset = data_lib.prepare(*typed_sections(saved), RunDir.at(workdir), tokenizer=tok)
    batch = dataset.get_batch(0, saved.train.batch_size, saved.train.seq_len, saved.seed)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(batch["inputs"]).long()).logits.double().numpy()
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    token_loss = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    ref_loss = float((token_loss * batch["weights"]).sum() / batch["weights"].sum())
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert abs(losses[1] - ref_loss) < 1e-4, (losses[1], ref_loss)
    assert np.mean([losses[s] for s in range(steps - 2, steps + 1)]) < 0.85 * losses[1], losses  # 6.84 -> 5.18 here

    loaded = gptjax.load(workdir)
    texts = loaded.generate(["OSLO - The", "Officials in"], max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = loaded.generate_tokens([tok.encode("Officials in")], max_new_tokens=8, temperature=0)[0]
    assert 0 < len(ids) <= 8 and all(0 <= i < tok.vocab_size for i in ids)


# One fine-tune serves three tests: the top block trained on a 3:1 mixture of news and pairs,
# four steps, checkpoints at 2 and 4 (the resume test stops a second run at 2).
TUNED = ("--config.optim.train_last_blocks=1", "--config.train.steps=4", "--config.train.batch_size=4",
         "--config.train.grad_accum=1", "--config.train.checkpoint_every=2")


def _tuned_config(hf_dir: str, news: str, pairs: str) -> config_lib.ConfigDict:
    return _recipe(hf_dir, f"files:{news}@3 + pairs:{pairs}@1", *TUNED)


@pytest.fixture(scope="module")
def tuned(hf_dir: str, news: str, pairs: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The workdir of a straight run of `_tuned_config`, on one device."""
    workdir = str(tmp_path_factory.mktemp("tuned") / "run")
    assert train.run(_tuned_config(hf_dir, news, pairs), workdir, devices=jax.devices()[:1])["step"] == 4
    return workdir


def test_train_last_blocks_freezes_the_rest_in_the_checkpoint(hf_dir: str, tuned: str) -> None:
    workdir = tuned
    _, before, _ = hf.load_hf_dir(hf_dir)
    _, after = checkpoint_read.load_for_inference(workdir)
    before, after = _flat(before), _flat(after)
    assert sorted(before) == sorted(after)
    saved = checkpoint_read.read_run_config(RunDir.at(workdir))  # the model shape is the import's
    rows = optim.make_optimizer(config_lib.sections(saved).optim, param_shapes(GPTConfig.from_config(saved.model)), 4).describe()
    trainable = {r.path for r in rows if r.trainable}
    assert trainable == {p for p in before if p.startswith(("h_1/", "ln_f/"))}  # the top block and the final LayerNorm
    for path in before:
        if path in trainable:
            assert not np.array_equal(after[path], before[path]), f"{path} did not change"
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_prompt_tokens_contribute_no_gradient(hf_dir: str, pairs: str, tmp_path) -> None:
    c = _recipe(hf_dir, f"pairs:{pairs}", "--config.train.steps=1")
    fields, params, tok = hf.load_hf_dir(hf_dir)
    dataset = data_lib.prepare(*typed_sections(c), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    batch = dataset.get_batch(0, 4, 32, seed=0)
    w = batch["weights"]
    assert 0.2 < w.mean() < 0.8  # prompt targets (weight 0) and completion targets (weight 1)

    def changed(where: np.ndarray) -> dict[str, np.ndarray]:
        targets = batch["targets"].copy()
        targets[where] = (targets[where] + 1 + np.arange(where.sum()) % 7) % tok.vocab_size
        return {**batch, "targets": targets}

    prompt_changed = changed(w == 0)
    one = np.zeros_like(w, bool)
    one[tuple(np.argwhere(w == 1)[0])] = True
    completion_changed = changed(one)

    gpt = GPTConfig(**fields)
    model = GPT(gpt)

    @jax.jit
    def loss_and_grads(p, b):
        def loss(p):
            # a packed row: each example attends to itself only, from position 0
            logits = model.apply({"params": p}, b["inputs"], b["positions"], segment_ids=b["segment_ids"],
                                 deterministic=True)
            s, n = cross_entropy(logits, b["targets"], b["weights"])
            return s / n
        return jax.value_and_grad(loss)(p)

    base_loss, base_grads = loss_and_grads(params, batch)
    p_loss, p_grads = loss_and_grads(params, prompt_changed)
    c_loss, c_grads = loss_and_grads(params, completion_changed)
    assert float(p_loss) == float(base_loss) and float(c_loss) != float(base_loss)
    base_flat, p_flat, c_flat = _flat(base_grads), _flat(p_grads), _flat(c_grads)
    for path in base_flat:
        np.testing.assert_array_equal(p_flat[path], base_flat[path], err_msg=path)
    assert any(not np.allclose(c_flat[k], base_flat[k], rtol=0, atol=1e-7) for k in base_flat)

    # The same through the trainer's jitted step: loss, gradient norm and the updated weights.
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    steps = step.build_steps(gpt, optim.make_optimizer(config_lib.sections(c).optim, params, 1), mesh, seed=0)
    results = []
    for b in (batch, prompt_changed, completion_changed):
        state, metrics = steps.train_step(steps.state_from_params(params), b)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), _flat(state.params)))
    (l0, g0, p0), (l1, g1, p1), (l2, g2, _) = results
    assert (l1, g1) == (l0, g0) and l2 != l0 and g2 != g0
    assert abs(l0 - float(base_loss)) < 1e-5
    for path in p0:
        np.testing.assert_array_equal(p1[path], p0[path], err_msg=path)


def test_mixture_of_text_and_pairs_trains(news: str, pairs: str, tuned: str) -> None:
    workdir = tuned
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))

    # The rows of the run's batches come from the sources in proportion 3:1. A pairs row always
    # holds prompt targets (weight 0), as every record is shorter than a window; a news row has none.
    run_dir = RunDir.at(workdir)
    dataset = data_lib.prepare(*typed_sections(checkpoint_read.read_run_config(run_dir)), run_dir, tokenizer=load_tokenizer(run_dir.tokenizer))
    assert dataset.sources == [f"files:{news}", f"pairs:{pairs}"]
    weights = np.concatenate([dataset.get_batch(s, 16, 32, seed=0)["weights"] for s in range(200)])
    from_pairs = (weights == 0).any(axis=1)
    assert abs(from_pairs.mean() - 0.25) < 0.04  # 3200 rows: the standard error is 0.008


@pytest.fixture
def bad_inputs(hf_dir: str, news: str, tmp_path) -> dict[str, str]:
    pickled = str(tmp_path / "pickled")
    shutil.copytree(hf_dir, pickled, ignore=lambda _d, names: [n for n in names if n == "model.safetensors"])
    with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04never to be unpickled")
    qa = _write_jsonl(str(tmp_path / "qa.jsonl"), [{"prompt": "a?", "completion": " b"}, {"prompt": "c?"}])
    return {"hf": hf_dir, "news": news, "pickled": pickled, "qa": qa}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.source=files:{news}@-1 + pairs:{qa}@1"], "must be a finite number >= 0"),
        (["--config.data.source=files:{news}@0 + pairs:{qa}@0"], "has all mixture weights zero"),
        (["--config.data.source=files:{news}@3 + pairs:{qa}@1"], "qa.jsonl:2: pairs record lacks a string 'completion'"),
        (["--config.init_from=hf:{pickled}"], "pytorch_model.bin) but no model.safetensors; gptjax reads only safetensors"),
        (["--config.optim.freeze=h_7"], "optim.freeze pattern 'h_7' matches no parameter"),
    ],
    ids=["negative_weight", "zero_weights", "pairs_field", "pickle_only", "freeze_unmatched"],
)
def test_bad_finetune_input_is_one_line_exit_2(bad_inputs, overrides, message, tmp_path, capsys) -> None:
    workdir = tmp_path / "w"
    argv = ["--config", RECIPE, "--workdir", str(workdir), "--config.init_from=hf:{hf}",
            "--config.data.source=files:{news}", *SMALL, *overrides]
    with pytest.raises(SystemExit) as exc:
        train.main([a.format(**bad_inputs) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err  # after what data preparation said
    assert not workdir.exists()


def test_resumed_fine_tune_continues_from_its_checkpoint_not_the_import(hf_dir: str, news: str, pairs: str, tuned: str,
                                                                      tmp_path) -> None:
    """A fine-tune stopped and rerun resumes its own checkpoint: the same losses as a straight run."""
    resumed = str(tmp_path / "resumed")
    one = jax.devices()[:1]
    assert train.run(_tuned_config(hf_dir, news, pairs), resumed, devices=one, stop_at=2)["step"] == 2
    assert train.run(_tuned_config(hf_dir, news, pairs), resumed, devices=one)["step"] == 4
    a, b = _losses(tuned), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
