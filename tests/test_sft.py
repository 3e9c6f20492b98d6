"""Supervised fine-tuning: whole examples packed into rows with segment ids, attention kept within
an example, per-source evaluation, exact resume, and the same losses as transformers' Trainer."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gptjax import data, train
from gptjax.data.batches import find_examples
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.evaluate.bpb import eval_line, eval_metrics, source_labels
from gptjax.model import GPT, GPTConfig, init_params
from test_data import ByteTokenizer, typed_sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n: int, seed: int = 0, long: int = 0) -> list[dict[str, str]]:
    """Upper-case prompts 'Q<i>:...' and lower-case completions; `long` more with a 60-byte prompt."""
    rng = random.Random(seed)
    out = [{"prompt": f"Q{i}:" + "P" * rng.randint(1, 12), "completion": "a" * rng.randint(1, 9)} for i in range(n)]
    return out + [{"prompt": f"L{i}:" + "P" * 60, "completion": "b" * 5} for i in range(long)]


def _write_jsonl(path, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _dataset(tmp_path, source: str, **fields) -> data.Dataset:
    config = ml_collections.ConfigDict({"data": {"source": source, "val_fraction": 0.2, **fields}})
    return data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=ByteTokenizer())


@pytest.fixture
def pairs(tmp_path) -> str:
    return _write_jsonl(tmp_path / "qa.jsonl", _records(80))


def _segments(batch: dict[str, np.ndarray], r: int) -> list[np.ndarray]:
    """The slots of each example in row r."""
    seg = batch["segment_ids"][r]
    return [np.flatnonzero(seg == k) for k in range(1, seg.max() + 1)]


def test_rows_hold_whole_examples_from_their_prompt_with_positions_from_0(tmp_path, pairs):
    ds = _dataset(tmp_path, f"pairs:{pairs}")
    whole = {r["prompt"] + r["completion"] + "|" for r in _records(80)}
    text = ds.tokenizer.decode
    seen = 0
    for step in range(20):
        b = ds.get_batch(step, 8, 48, seed=0)
        assert set(b) == {"inputs", "targets", "weights", "segment_ids", "positions"}
        for r in range(8):
            segments = _segments(b, r)
            assert len(segments) >= 2  # packed: short examples share a row
            used = np.concatenate(segments)
            np.testing.assert_array_equal(used, np.arange(len(used)))  # one after another, padding at the end
            assert (b["weights"][r, len(used):] == 0).all() and (b["segment_ids"][r, len(used):] == 0).all()
            for slots in segments:
                example = text(np.append(b["inputs"][r, slots], b["targets"][r, slots[-1]]))
                assert example in whole, example  # starts at its prompt, ends at its end-of-text
                np.testing.assert_array_equal(b["positions"][r, slots], np.arange(len(slots)))
                completion = len(example) - example.index(":") - 1 - example[example.index(":") + 1:].count("P")
                expected = np.arange(len(slots)) >= len(slots) - completion  # completion and end-of-text
                np.testing.assert_array_equal(b["weights"][r, slots], expected.astype(np.float32))
                seen += 1
    assert seen > 8 * 20 * 2


def test_packing_off_is_one_example_per_row(tmp_path, pairs):
    ds = _dataset(tmp_path, f"pairs:{pairs}", packing=False)
    b = ds.get_batch(0, 8, 48, seed=0)
    assert (b["segment_ids"].max(axis=1) == 1).all()
    assert (b["segment_ids"][:, 0] == 1).all() and (b["weights"][b["segment_ids"] == 0] == 0).all()
    assert ds.tokenizer.decode(b["inputs"][0, :3]).startswith("Q")


def test_packed_batches_depend_only_on_seed_and_step(tmp_path, pairs):
    a, b = _dataset(tmp_path, f"pairs:{pairs}"), _dataset(tmp_path, f"pairs:{pairs}")  # b: after a restart
    x = a.get_batch(5, 8, 48, seed=1)
    for key, value in b.get_batch(5, 8, 48, seed=1).items():
        np.testing.assert_array_equal(value, x[key])
    assert not np.array_equal(x["inputs"], a.get_batch(6, 8, 48, seed=1)["inputs"])
    assert not np.array_equal(x["inputs"], a.get_batch(5, 8, 48, seed=2)["inputs"])
    parts = [a.get_batch(5, 8, 48, seed=1, process_index=p, process_count=4) for p in range(4)]
    for key in x:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), x[key])


def test_long_examples_are_cut_from_the_prompt_or_dropped_and_counted(tmp_path, capfd):
    path = _write_jsonl(tmp_path / "qa.jsonl", _records(30, long=4) + [{"prompt": "x", "completion": "c" * 80}])
    ds = _dataset(tmp_path, f"pairs:{path}")
    ds.check(32)
    err = capfd.readouterr().err
    stream = ds.train[0]
    ex = find_examples(stream, ByteTokenizer.eot_id, 32, "truncate")
    ex_all = find_examples(ds.train[0], ByteTokenizer.eot_id, 200, "truncate")
    val = find_examples(ds.val[0], ByteTokenizer.eot_id, 32, "truncate")
    assert ex_all.too_long == 0 and ex.total == ex_all.total
    assert ex.too_long + val.too_long == 5 and ex.dropped + val.dropped == 1  # the completion of 80 cannot fit
    assert "5 longer than seq_len+1=33 tokens: 4 with the prompt cut from the left, 1 left out" in err, err
    assert (ex.lengths <= 33).all() and len(ex.lengths) == ex.total - ex.dropped
    for s, n in zip(ex.starts, ex.lengths):
        text = ds.tokenizer.decode(stream.tokens[s : s + n])
        if text.startswith("P"):  # a cut example keeps the end of its prompt, and its whole completion
            assert text == "P" * (33 - 6) + "bbbbb|"
    dropped = find_examples(stream, ByteTokenizer.eot_id, 32, "drop")
    assert dropped.dropped == dropped.too_long == ex.too_long and len(dropped.lengths) == ex.total - ex.too_long
    with pytest.raises(UserError, match="data.long_examples must be one of"):
        _dataset(tmp_path, f"pairs:{path}", long_examples="keep")
    with pytest.raises(UserError, match="none of its .* training examples fits a row"):
        ds.check(1)


def test_mixture_proportions_hold_with_packing(tmp_path, pairs):
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text("alpha beta gamma delta\n" * 40)
    ds = _dataset(tmp_path, f"files:{tmp_path}/txt/*.txt@3 + pairs:{pairs}@1")
    rows = [ds.get_batch(s, 16, 32, seed=0) for s in range(200)]
    weights = np.concatenate([b["weights"] for b in rows])
    segments = np.concatenate([b["segment_ids"] for b in rows])
    from_pairs = (weights == 0).any(axis=1)  # a prompt's targets; a text row trains on everything
    assert abs(from_pairs.mean() - 0.25) < 0.04  # 3200 rows: the standard error is 0.008
    assert (segments[~from_pairs] == 1).all() and segments[from_pairs].max(axis=1).mean() > 1.5
    positions = np.concatenate([b["positions"] for b in rows])
    np.testing.assert_array_equal(positions[~from_pairs], np.broadcast_to(np.arange(32), positions[~from_pairs].shape))

    ev = ds.eval_batches(4, 32, max_batches=50)
    src = np.concatenate([b["sources"] for b in ev])
    assert src.shape[1] == 2 and set(src.sum(axis=1)) <= {0.0, 1.0}
    val_pairs = find_examples(ds.val[1], ByteTokenizer.eot_id, 32, "truncate")
    in_rows = sum(int(b["segment_ids"][r].max()) for b in ev for r in range(4) if b["sources"][r, 1])
    assert in_rows == len(val_pairs.lengths)  # every validation example once


def test_document_mask_splits_text_at_end_of_text(tmp_path):
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text(f"doc {i} " + "xyz " * 5)
    ds = _dataset(tmp_path, f"files:{tmp_path}/*.txt", document_mask=True)
    b = ds.get_batch(0, 4, 40, seed=0)
    eot = ByteTokenizer.eot_id
    for inputs, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
        starts = np.flatnonzero(inputs == eot)
        assert len(starts) >= 1
        np.testing.assert_array_equal(np.diff(seg) != 0, (inputs == eot)[1:])  # an end-of-text starts a segment
        assert (pos[starts] == 0).all() and pos[0] == 0
        np.testing.assert_array_equal(np.diff(pos)[np.diff(seg) == 0], 1)
    assert "segment_ids" not in _dataset(tmp_path, f"files:{tmp_path}/*.txt").get_batch(0, 4, 40, seed=0)


def test_eval_metrics_and_line_name_each_source():
    sources = ["files:data/news/*.jsonl", "pairs:data/qa.jsonl"]
    m = eval_metrics(2.0, [3.0, 1.0], sources)
    assert m["val_loss/files:*.jsonl"] == 3.0 and m["val_ppl/pairs:qa.jsonl"] == pytest.approx(np.e)
    assert eval_line(7, m) == ("step 7: val_loss 2.0000  val_ppl 7.39 | files:*.jsonl 3.0000 (ppl 20.09), "
                               "pairs:qa.jsonl 1.0000 (ppl 2.72)")
    assert source_labels(["files:a/*.txt", "files:b/*.txt"]) == ["files:a/*.txt", "files:b/*.txt"]  # would collide
    assert eval_metrics(2.0, None, sources) == eval_metrics(2.0, [2.0], sources[:1]) == {"val_loss": 2.0,
                                                                                       "val_ppl": pytest.approx(np.e**2)}


# --- the model ---------------------------------------------------------------------------------

CFG = GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=32, block_size=64)


@pytest.fixture(scope="module")
def params():
    # Compiled once rather than op by op (the tests need random parameters, not these exact values).
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))


def test_a_tokens_logits_ignore_the_other_examples_of_its_row(tmp_path, pairs, params):
    ds = _dataset(tmp_path, f"pairs:{pairs}")
    b = ds.get_batch(0, 8, 48, seed=0)
    r = next(r for r in range(8) if len(_segments(b, r)) >= 3)
    first, second, third = _segments(b, r)[:3]
    apply = jax.jit(GPT(CFG).apply)  # one program per signature, not op-by-op dispatch
    row = {k: jnp.asarray(b[k][r : r + 1]) for k in ("inputs", "positions", "segment_ids")}

    def logits(inputs, segments=True):
        return np.asarray(apply({"params": params}, inputs, row["positions"],
                                segment_ids=row["segment_ids"] if segments else None))

    changed = row["inputs"].at[0, second].set((row["inputs"][0, second] + 1 + jnp.arange(len(second))) % 256)
    base, other = logits(row["inputs"]), logits(changed)
    np.testing.assert_array_equal(other[0, first], base[0, first])
    np.testing.assert_array_equal(other[0, third], base[0, third])
    assert np.abs(other[0, second] - base[0, second]).max() > 1e-3
    # Without segment ids the third example sees the second.
    assert np.abs(logits(changed, False)[0, third] - logits(row["inputs"], False)[0, third]).max() > 1e-3
    # The example's logits in the row are those of the example alone, from position 0.
    alone = np.asarray(apply({"params": params}, row["inputs"][:, third]))
    np.testing.assert_allclose(base[0, third], alone[0], atol=2e-5)


def test_one_segment_is_the_plain_causal_model(params):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, CFG.vocab_size)
    model = GPT(CFG)
    apply = jax.jit(model.apply)
    plain = apply({"params": params}, tokens)
    one = apply({"params": params}, tokens, segment_ids=jnp.ones((2, 24), jnp.int32))
    np.testing.assert_allclose(np.asarray(one), np.asarray(plain), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not for decoding"):
        model.init(jax.random.PRNGKey(0), tokens, segment_ids=jnp.ones((2, 24), jnp.int32), decode=True)


# --- through the trainer, against transformers ----------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_fixtures import build_hf_dir  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_trainer  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_hf_dir(str(tmp_path_factory.mktemp("hf") / "gpt2-tiny"))


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> str:
    return compare_trainer.make_pairs(str(tmp_path_factory.mktemp("qa") / "qa.jsonl"), 300)


def test_compare_trainer_refuses_a_bad_setting_in_one_line(hf_dir, qa, capsys):
    """A setting gptjax refuses (warm-up longer than the run) is one line and exit status 2."""
    with pytest.raises(SystemExit) as exit:
        compare_trainer.main(["--hf_dir", hf_dir, "--pairs", qa, "--steps", "4", "--warmup", "5"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: optim.warmup_steps=5 is more than the 4 training steps")


def test_same_completion_losses_as_transformers_trainer(hf_dir, qa, tmp_path):
    """One example per row, the same rows, schedule and AdamW: each step's loss within 1e-3 relative."""
    fig = compare_trainer.compare(hf_dir, qa, str(tmp_path), steps=6, batch_size=4, seq_len=64, lr=1e-3, warmup=2,
                                  eval_every=0, packed=False)
    assert len(fig["trainer_losses"]) == len(fig["gptjax_losses"]) == 6
    assert fig["gptjax_losses"][-1] < fig["gptjax_losses"][0]  # it learns: the comparison is not of constants
    assert max(fig["rel_diff"]) < 1e-3, fig["rel_diff"]


def test_per_source_validation_loss_is_the_completion_loss(hf_dir, qa, tmp_path):
    """The eval of a packed mixture: the pairs source's loss is transformers' completion loss over
    its validation examples, each alone; the overall loss lies between the sources'."""
    from gptjax.prepare import prepare
    from gptjax.run import resolve

    news = tmp_path / "news.txt"
    news.write_text("Officials in Oslo said the night train was confirmed by the port authority.\n" * 300)
    c = compare_trainer.gptjax_config(hf_dir, qa, steps=1, batch_size=4, seq_len=64, lr=1e-3, warmup=1, packing=True)
    c.data.source = f"files:{news}@1 + pairs:{qa}@1"
    r = prepare(resolve(c, str(tmp_path / "run"), devices=jax.devices()[:1]))
    batches = r.dataset.eval_batches(4, 64, max_batches=100)
    overall, (text_loss, pairs_loss) = r.steps.evaluate_sources(r.steps.state_from_params(r.pretrained).params,
                                                                  batches)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    val = find_examples(r.dataset.val[1], r.dataset.tokenizer.eot_id, 64, "truncate")
    total = count = 0.0
    mask = r.dataset.val[1].mask
    for s, n in zip(val.starts, val.lengths):
        ids = torch.tensor(np.asarray(r.dataset.val[1].tokens[s : s + n], np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        w = torch.tensor(mask[s + 1 : s + n], dtype=torch.float64)
        total += float(-(logp.gather(1, ids[0, 1:, None])[:, 0] * w).sum())
        count += float(w.sum())
    assert abs(pairs_loss - total / count) < 1e-4 * total / count, (pairs_loss, total / count)
    assert min(text_loss, pairs_loss) < overall < max(text_loss, pairs_loss)


def test_packed_run_resumes_exactly_and_logs_each_source(hf_dir, qa, tmp_path, capsys):
    news = tmp_path / "news.txt"
    news.write_text("Officials in Oslo said the night train was confirmed by the port authority.\n" * 300)

    def config():
        c = compare_trainer.gptjax_config(hf_dir, qa, steps=4, batch_size=4, seq_len=64, lr=1e-3, warmup=1,
                                          packing=True)
        c.data.source = f"files:{news}@1 + pairs:{qa}@1"
        c.train.update(log_every=1, eval_every=2, eval_batches=2, checkpoint_every=2, peak_tflops=1.0)  # no matmul timed
        return c

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    one = jax.devices()[:1]
    assert train.run(config(), straight, devices=one)["step"] == 4
    out = capsys.readouterr().out
    shutil.copytree(straight, resumed)  # as if stopped after the checkpoint of step 2
    shutil.rmtree(os.path.join(RunDir.at(resumed).checkpoints, "4"))
    assert train.run(config(), resumed, devices=one)["step"] == 4
    assert "resuming from step 2" in capsys.readouterr().out
    assert "step 4: val_loss " in out and " | files:news.txt " in out and ", pairs:qa.jsonl " in out, out

    def records(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    a, b = records(straight), records(resumed)
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]
    assert losses(a) == losses(b) and [s for s, _ in losses(a)] == [1, 2, 3, 4]
    evals = [r for r in a if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"val_loss/files:news.txt", "val_ppl/files:news.txt", "val_loss/pairs:qa.jsonl",
                "val_ppl/pairs:qa.jsonl"} <= set(r)
        assert min(r["val_loss/files:news.txt"], r["val_loss/pairs:qa.jsonl"]) < r["val_loss"]
    assert [r for r in b if "val_loss" in r] == evals
