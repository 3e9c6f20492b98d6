"""`gptjax.evaluate`: bits per byte against a hand computation, the scorer against direct
log-probabilities, and `python -m gptjax.eval` on the shared trained run."""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.checkpoint_read import load_for_inference
from gptjax.errors import UserError
from gptjax.evaluate import cli
from gptjax.evaluate.bpb import scored_text
from gptjax.evaluate.rolling import rolling_requests
from gptjax.evaluate.scoring import Scorer
from gptjax.model import GPT, GPTConfig
from gptjax.tokenizer import load_tokenizer


class CharTokenizer:
    """Token i spells PIECES[i]; the last id is end-of-text. Multi-byte characters included."""

    PIECES = ["a", "é", "日本", " b", "🙂", "x"]
    eot_id = len(PIECES)

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def _batch(targets, weights, sources=None):
    b = {"targets": np.array(targets, np.int32), "weights": np.array(weights, np.float32)}
    if sources is not None:
        b["sources"] = np.array(sources, np.float32)
    return b


def test_scored_text_counts_the_bytes_of_scored_runs():
    tok, eot = CharTokenizer(), CharTokenizer.eot_id
    # Row 0: a é <eot> 日本 ; row 1 continues row 0's run: " b" (weight 0: prompt) 🙂 x ; row 2 padding.
    batches = [_batch([[0, 1, eot, 2], [3, 4, 5, 0], [0, 0, 0, 0]],
                      [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])]
    cov = scored_text(batches, tok)
    scored = "a" + "é" + "日本" + "🙂" + "x" + "a"  # the end-of-text and the unscored " b" spell nothing
    assert cov.tokens == (7.0,) and cov.bytes == (len(scored.encode()),)
    assert cov.bits_per_byte(2.0) == pytest.approx(2.0 * 7 / (len(scored.encode()) * math.log(2)))
    # Two sources: each row counts for its own.
    mixed = [_batch([[0, 1], [2, 4], [0, 0]], [[1, 1], [1, 1], [0, 0]], sources=[[1, 0], [0, 1], [0, 0]])]
    cov = scored_text(mixed, tok, n_sources=2)
    assert cov.tokens == (2.0, 2.0) and cov.bytes == (len("aé".encode()), len("日本🙂".encode()))


@pytest.fixture(scope="module")
def run_metrics(trained_run):
    """`python -m gptjax.eval`'s metrics for the trained run's own validation text, all of it."""
    return cli.evaluate_run(trained_run.workdir, eval_batches=0)


def _logits(gpt: GPTConfig, params, tokens: np.ndarray) -> np.ndarray:
    """The model's logits [rows, seq, vocab] in float64, from one jitted forward pass over the
    rows padded to 32 x block_size (right padding changes no earlier position's logits; one
    shape, so the tests here compile it once)."""
    rows, seq = tokens.shape
    padded = np.zeros((32, gpt.block_size), np.int32)
    padded[:rows, :seq] = tokens
    logits = jax.jit(lambda p, x: GPT(gpt).apply({"params": p}, x))(params, jnp.asarray(padded))
    return np.asarray(logits, np.float64)[:rows, :seq]


def _val_stream(trained_run) -> np.ndarray:
    (directory,) = glob.glob(os.path.join(trained_run.workdir, "data", "files-*"))
    dtype = json.load(open(os.path.join(directory, "meta.json")))["dtype"]
    return np.fromfile(os.path.join(directory, "val.bin"), dtype=dtype)


def test_bits_per_byte_matches_a_hand_computation(trained_run, run_metrics):
    """Every window of seq_len of the validation stream scored with the model directly: its
    nats / ln 2 over the UTF-8 bytes of the text its targets spell (split at end-of-text)."""
    config, params = load_for_inference(trained_run.workdir)
    gpt, seq = GPTConfig.from_config(config.model), config.train.seq_len
    tok = load_tokenizer(os.path.join(trained_run.workdir, "tokenizer"))
    stream = _val_stream(trained_run).astype(np.int32)
    n = (len(stream) - 1) // seq
    windows = np.stack([stream[k * seq : k * seq + seq + 1] for k in range(n)])
    logits = _logits(gpt, params, windows[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nats = -float(np.take_along_axis(np.asarray(logp), windows[:, 1:, None], -1).sum())
    targets = stream[1 : n * seq + 1].tolist()
    text, piece = 0, []
    for t in targets + [tok.eot_id]:
        if t == tok.eot_id:
            text += len(tok.decode(piece).encode("utf-8"))
            piece = []
        else:
            piece.append(t)
    assert run_metrics["val_tokens"] == n * seq and run_metrics["val_bytes"] == text
    assert run_metrics["val_loss"] == pytest.approx(nats / (n * seq), rel=1e-5)
    assert run_metrics["val_bpb"] == pytest.approx(nats / math.log(2) / text, rel=1e-5)


def test_the_runs_own_source_gives_the_val_loss_training_logged(trained_run, capsys):
    logged = [json.loads(l) for l in open(os.path.join(trained_run.workdir, "metrics.jsonl"))]
    last = [r for r in logged if "val_loss" in r][-1]
    assert last["step"] == 20 and "val_bpb" in last
    cli.main(["--workdir", trained_run.workdir])
    out = capsys.readouterr().out
    assert f"val_loss {last['val_loss']:.4f}" in out and f"val_bpb {last['val_bpb']:.4f}" in out


def test_scorer_matches_log_probabilities_of_the_whole_sequence(trained_run):
    config, params = load_for_inference(trained_run.workdir)
    gpt = GPTConfig.from_config(config.model)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, gpt.vocab_size, n).tolist(), rng.integers(0, gpt.vocab_size, m).tolist())
                for n, m in [(1, 1), (5, 3), (20, 7), (gpt.block_size + 9, 4)]]  # the last one is cut
    scorer = Scorer(gpt, params, batch_size=3)
    got = scorer.loglikelihoods(requests)
    rows = [np.array((c + k)[-(gpt.block_size + 1):]) for c, k in requests]
    padded = np.zeros((len(rows), gpt.block_size), np.int32)  # right padding: causal, changes nothing before it
    for i, tokens in enumerate(rows):
        padded[i, : len(tokens) - 1] = tokens[:-1]
    all_logits = _logits(gpt, params, padded)
    for (context, continuation), (logp, greedy), tokens, row_logits in zip(requests, got, rows, all_logits):
        logits = row_logits[: len(tokens) - 1]
        lp = jax.nn.log_softmax(logits, axis=-1)
        cont = slice(len(tokens) - 1 - len(continuation), len(tokens) - 1)
        want = float(np.take_along_axis(np.asarray(lp)[cont], tokens[1:][cont, None], -1).sum())
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logits[cont].argmax(-1) == tokens[1:][cont]).all())
    # The greedy continuation is recognised as greedy.
    context = requests[2][0]
    logits = all_logits[2][len(context) - 1]
    assert scorer.loglikelihoods([(context, [int(logits.argmax())])])[0][1] is True
    with pytest.raises(ValueError, match="at least one token"):
        scorer.loglikelihoods([([], [1])])


@pytest.mark.parametrize("argv, message", [
    (["--source", "nosuch:x"], "unknown source kind"),
    (["--hellaswag", "/no/such.jsonl"], "does not exist"),
    (["--eval_batches", "-1"], "must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(trained_run, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--workdir", trained_run.workdir, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a gptjax run"):
        cli.evaluate_run(str(tmp_path))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 70])
def test_rolling_windows_are_lm_evals(n):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n))
    want = [utils.make_disjoint_window(w) for w in
            utils.get_rolling_token_windows(token_list=tokens, prefix_token=7, max_seq_len=32, context_len=1)]
    assert rolling_requests(tokens, 7, 32) == [(list(c), list(k)) for c, k in want]


def test_rolling_scores_each_document_whole_from_end_of_text(trained_run, tmp_path):
    """Two documents shorter than the context: each is predicted from end-of-text alone, its
    bytes are its text's."""
    texts = ["def f1_2(alpha):\n    return beta + 2\n", "def f9_9(sigma):\n    return omega + 9\n    # é\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    m = cli.evaluate_run(trained_run.workdir, source=f"files:{tmp_path}/*.txt", rolling=True)
    config, params = load_for_inference(trained_run.workdir)
    gpt = GPTConfig.from_config(config.model)
    tok = load_tokenizer(os.path.join(trained_run.workdir, "tokenizer"))
    ids = [tok.encode(text) for text in texts]
    rows = np.zeros((2, gpt.block_size), np.int32)
    for i, row in enumerate(ids):
        rows[i, : len(row)] = [tok.eot_id] + row[:-1]
    logp = np.asarray(jax.nn.log_softmax(_logits(gpt, params, rows), axis=-1))
    nats = -sum(float(np.take_along_axis(logp[i, : len(row)], np.array(row)[:, None], -1).sum()) for i, row in enumerate(ids))
    n_tokens = sum(len(row) for row in ids)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert (m["documents"], m["rolling_tokens"], m["rolling_bytes"]) == (2, n_tokens, n_bytes) and n_tokens < 2 * 32
    assert m["rolling_loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert m["rolling_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
