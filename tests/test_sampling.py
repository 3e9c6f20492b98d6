"""The decoder: cache == recompute, filters == transformers' warpers, sampling statistics,
batch == alone, stop tokens, seeds, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gptjax import sampling
from gptjax.errors import UserError
from gptjax.sampling.filters import num_candidates
from gptjax.model import GPT, GPTConfig, init_params

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine! " * 4
CHARS = sorted(set(TEXT))
CFG = GPTConfig(vocab_size=len(CHARS) + 1, n_layer=2, n_head=2, n_embd=32, block_size=128)
EOT = len(CHARS)  # an extra id the text never uses


def encode(s):
    return [CHARS.index(c) for c in s]


@pytest.fixture(scope="module")
def trained():
    """A tiny fp32 GPT trained on repeated text, so greedy is not degenerate. 120 steps take the
    loss to about 0.1 (it is under 1.0 by step 60): the model writes the text back, stops at a
    '.' within 40 greedy tokens, and keeps writing text past the context window."""
    data = np.array(encode(TEXT * 3), np.int32)
    model = GPT(CFG)
    params = init_params(CFG, jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        def loss(p):
            logits = model.apply({"params": p}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(0)
    for _ in range(120):
        starts = rng.integers(0, len(data) - 65, 16)
        batch = jnp.asarray(np.stack([data[s : s + 65] for s in starts]))
        params, state, value = step(params, state, batch)
    assert float(value) < 1.0, f"the tiny model did not learn (loss {float(value):.3f})"
    return params


_forward = jax.jit(lambda p, t: GPT(CFG).apply({"params": p}, t))  # one compile for every reference step


def greedy_by_recompute(params, prompt, n):
    """Greedy decoding that runs the full forward pass over the whole sequence each step."""
    fwd = _forward
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, CFG.block_size), np.int32)  # right padding: causal, so harmless
        padded[0, : len(seq)] = seq
        logits = fwd(params, jnp.asarray(padded))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_cached_greedy_equals_full_recompute(trained):
    prompts = [encode("the quick"), encode("a stitch in t"), encode("lazy")]
    got = sampling.generate_tokens(CFG, trained, prompts, max_new_tokens=64, temperature=0)
    for prompt, row in zip(prompts, got):
        want = greedy_by_recompute(trained, prompt, 64)
        assert row == want
        assert len(set(row)) > 5  # the trained model writes text, not one repeated token


# ------------------------------------------------------------------------ filters vs transformers


def hf_filter(logits, temperature, top_k, top_p):
    x = torch.tensor(np.asarray(logits, np.float32))
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.numpy()


def assert_same_filter(logits, temperature, top_k, top_p, candidates=None):
    ours = np.asarray(sampling.filter_logits(logits, temperature, top_k, top_p, candidates=candidates))
    want = hf_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(want))
    kept = ~np.isneginf(want)
    np.testing.assert_allclose(ours[kept], want[kept], rtol=1e-6)


SETTINGS = [
    (1.0, 0, 0.9),
    (0.7, 50, 0.95),
    (1.3, 5, 1.0),
    (0.5, 0, 0.5),
    (1.0, 0, 1e-6),  # p at the low edge: only the most likely token
    (1.0, 0, 0.999999),  # p at the high edge: a long tail
    (2.0, 1, 0.3),
    (1.0, 0, 1.0),  # temperature only
]


# A vocabulary smaller than the candidates (every token one) and GPT-2's (the candidates, then
# the exact fallback where the cut falls past them; a long tail for p near 1).
@pytest.mark.parametrize("vocab", [10, 50257])
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filters_match_transformers_on_random_logits(vocab, temperature, top_k, top_p):
    top_k = min(top_k, vocab)
    logits = np.random.default_rng(vocab).normal(size=(3, vocab)).astype(np.float32) * 3
    assert_same_filter(logits, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature,top_k,top_p", [s for s in SETTINGS if s[1] <= 8])
def test_exact_fallback_matches_transformers(temperature, top_k, top_p):
    """With 8 candidates the top-p cut rarely falls among them: the bisection path decides."""
    logits = np.random.default_rng(1).normal(size=(4, 3000)).astype(np.float32)
    assert_same_filter(logits, temperature, top_k, top_p, candidates=8)


def test_top_k_ties_are_kept_like_transformers():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0, -1.0, 2.0]] * 2, np.float32)
    big = np.zeros((2, 5000), np.float32)
    big[:, ::7] = 1.0  # 715 tokens tied at the top, far more than top_k and the candidates
    for k in (1, 2, 3, 4, 6):
        assert_same_filter(logits, 1.0, k, 1.0)
    for k in (5, 40, 700):
        assert_same_filter(big, 1.0, k, 1.0)
        # The top-p cut splits the tie; torch.sort orders long rows arbitrarily, so only
        # the number kept is defined.
        ours = np.asarray(sampling.filter_logits(big, 1.0, k, 0.5))
        assert (np.isfinite(ours).sum(-1) == np.isfinite(hf_filter(big, 1.0, k, 0.5)).sum(-1)).all()


@pytest.mark.parametrize("top_p", [0.05, 0.15, 0.3, 0.45, 0.55, 0.65, 0.72, 0.78, 0.88, 0.93, 0.99])
@pytest.mark.parametrize("candidates", [None, 2])
def test_top_p_ties_match_transformers(top_p, candidates):
    """Ties that straddle the top-p cut. transformers' torch.sort is stable for rows of <= 16
    values (checked in the test below), so its tie order is defined there; ours is the same.
    The p values avoid the exact cumulative sums (0.1, 0.2, 0.25, ...), where the answer
    depends on the rounding of the sum rather than on the semantics."""
    logits = np.log(np.array([[0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1], [0.25, 0.25, 0.25, 0.05, 0.05, 0.05, 0.1]], np.float32))
    assert_same_filter(logits, 1.0, 0, top_p, candidates=candidates)
    assert_same_filter(logits, 1.0, 6, top_p, candidates=candidates and 8)


def test_torch_sort_is_stable_on_short_rows():
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    _, idx = torch.sort(x)
    assert idx.tolist() == [[0, 2, 4, 6, 1, 3, 5]]


# ------------------------------------------------------------------------ sampling statistics


def expected_probs(logits, temperature, top_k, top_p):
    x = hf_filter(logits[None], temperature, top_k, top_p)[0].astype(np.float64)
    p = np.exp(x - x[np.isfinite(x)].max())
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,m",
    [(1.0, 0, 1.0, 64), (0.8, 10, 0.9, 64), (1.2, 0, 0.7, 64), (1.2, 0, 0.7, 4), (1.0, 3, 1.0, 64)],
)
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, m):
    vocab, n = 300, 40_000
    logits = np.random.default_rng(7).normal(size=vocab).astype(np.float32) * 2
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
    choose = jax.jit(
        lambda lg, k: sampling.choose_tokens(
            lg, k, jnp.float32(temperature), jnp.int32(max(top_k, 1)), jnp.float32(1.0 - top_p),
            greedy=False, use_k=top_k > 0, use_p=top_p < 1.0, m=m,
        )
    )
    tokens = np.asarray(choose(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), keys))
    counts = np.bincount(tokens, minlength=vocab)
    p = expected_probs(logits, temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0, "a filtered-out token was sampled"
    # Chi-square over the kept tokens, pooling those with a small expected count.
    exp = p * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    obs, ex = obs[ex > 0], ex[ex > 0]
    chi2 = float(((obs - ex) ** 2 / ex).sum())
    df = max(len(ex) - 1, 1)
    # 99.9th percentile of chi-square(df) by the Wilson-Hilferty approximation.
    z = 3.09
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"chi2={chi2:.1f} over df={df} (limit {limit:.1f})"


# ------------------------------------------------------------------------ batch, stop, seed


def test_row_in_a_mixed_batch_equals_the_row_alone(trained):
    # Lengths 3, 8 and 34: in the batch every row is left-padded to 64, by a different amount;
    # alone the first two share the 8-token prompt bucket (one compiled program for both).
    prompts = [encode("the"), encode("a stitch"), encode("jumps over the lazy dog. a stitch")]
    controls = dict(max_new_tokens=40, temperature=1.0, top_k=12, top_p=0.9)
    decoder = sampling.Decoder(CFG, trained)
    batch = decoder.generate_tokens(prompts, seed=3, **controls).tokens
    for i, prompt in enumerate(prompts):
        key = jax.random.fold_in(jax.random.PRNGKey(3), i)  # row i's documented key
        alone = decoder.generate_tokens([prompt], row_keys=key[None], **controls).tokens[0]
        assert alone == batch[i]
    # Greedy rows in a batch equal each row alone by `test_cached_greedy_equals_full_recompute`
    # (a batch of three lengths against each row's own full forward passes).


def test_stop_token_ends_a_row_and_is_cut(trained):
    decoder = sampling.Decoder(CFG, trained)
    prompts = [encode("the quick"), encode("a stitch")]
    full = decoder.generate_tokens(prompts, max_new_tokens=40, temperature=0).tokens
    stop = encode(".")[0]
    result = decoder.generate_tokens(prompts, max_new_tokens=40, temperature=0, stop_tokens=[stop, EOT])
    for row, cut, stopped in zip(full, result.tokens, result.stopped):
        want = row[: row.index(stop)] if stop in row else row
        assert cut == want and stopped == (stop in row)
    assert any(result.stopped)


def test_same_seed_same_text_and_streaming_equals_one_call(trained):
    decoder = sampling.Decoder(CFG, trained)
    prompts = [encode("the quick"), encode("over")]
    kw = dict(max_new_tokens=37, temperature=3.0, top_p=0.99)
    a = decoder.generate_tokens(prompts, seed=5, **kw).tokens
    assert decoder.generate_tokens(prompts, seed=5, **kw).tokens == a
    assert decoder.generate_tokens(prompts, seed=6, **kw).tokens != a
    pieces = [[] for _ in prompts]
    for new, _ in decoder.stream(prompts, seed=5, chunk=8, **kw):
        for i, row in enumerate(new):
            pieces[i].extend(row)
    assert pieces == a


def test_prompt_cut_from_the_left_when_asked(trained):
    """A prompt must fit the window; with truncate_prompt it keeps its last block_size tokens."""
    decoder = sampling.Decoder(CFG, trained)
    long = encode(TEXT)[:150]
    with pytest.raises(UserError, match="truncate"):
        decoder.generate_tokens([long], max_new_tokens=20, temperature=0)
    cut = decoder.generate_tokens([long], max_new_tokens=20, temperature=0, truncate_prompt=True).tokens
    assert cut == decoder.generate_tokens([long[-CFG.block_size:]], max_new_tokens=20, temperature=0).tokens


# ------------------------------------------------------------------------ past the context window

WIN = GPTConfig(**{**CFG.__dict__, "block_size": 32})


def window_params(trained):
    """The trained model with a 32-token window (its first 32 learned positions)."""
    return {**trained, "wpe": {"embedding": trained["wpe"]["embedding"][:32]}}


_window_forward = jax.jit(lambda p, t: GPT(WIN).apply({"params": p}, t))


def by_the_cropping_rule(params, prompts, n, choose):
    """Reference: each step runs the full forward pass, without a cache, over exactly the
    context the documented rule gives: the row's newest c tokens, c growing by one per token
    and dropping to block_size // 2 when one more would not fit."""
    fwd = _window_forward
    keep = WIN.block_size // 2
    seqs = [list(p) for p in prompts]
    lengths = [len(p) for p in prompts]
    for t in range(n):
        padded = np.zeros((len(seqs), WIN.block_size), np.int32)  # right padding: causal, so harmless
        for i, (seq, c) in enumerate(zip(seqs, lengths)):
            padded[i, :c] = seq[-c:]
        logits = fwd(params, jnp.asarray(padded))
        last = jnp.stack([logits[i, c - 1] for i, c in enumerate(lengths)])
        for i, tok in enumerate(np.asarray(choose(last, t))):
            seqs[i].append(int(tok))
            lengths[i] = lengths[i] + 1 if lengths[i] + 1 <= WIN.block_size else keep
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


# Lengths 32 (a full window at once), 11 and 4: the rows reach a full window at different steps.
WINDOW_PROMPTS = [encode(TEXT[3:35]), encode("a stitch in"), encode("lazy")]


def test_past_the_window_greedy_equals_full_forward_over_the_cropped_context(trained):
    params = window_params(trained)
    assert sampling.keep_length(WIN.block_size) == WIN.block_size // 2
    got = sampling.generate_tokens(WIN, params, WINDOW_PROMPTS, max_new_tokens=100, temperature=0)
    want = by_the_cropping_rule(params, WINDOW_PROMPTS, 100, lambda logits, t: jnp.argmax(logits, axis=-1))
    assert got == want
    assert all(len(set(row[-40:])) > 5 for row in got)  # still text after three crops


def test_past_the_window_sampled_equals_full_forward_over_the_cropped_context(trained):
    params = window_params(trained)
    controls = dict(temperature=1.0, top_k=12, top_p=0.9)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(4), i))(jnp.arange(len(WINDOW_PROMPTS)))
    choose = jax.jit(
        lambda logits, keys: sampling.choose_tokens(
            logits, keys, jnp.float32(1.0), jnp.int32(12), jnp.float32(1.0 - 0.9),
            greedy=False, use_k=True, use_p=True, m=num_candidates(WIN.vocab_size, 12),
        )
    )

    def step(logits, t):
        return choose(logits, jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys))

    decoder = sampling.Decoder(WIN, params)
    got = decoder.generate_tokens(WINDOW_PROMPTS, max_new_tokens=90, seed=4, **controls).tokens
    assert got == by_the_cropping_rule(params, WINDOW_PROMPTS, 90, step)
    pieces = [[] for _ in WINDOW_PROMPTS]
    for new, _ in decoder.stream(WINDOW_PROMPTS, seed=4, chunk=7, max_new_tokens=90, **controls):
        for i, row in enumerate(new):
            pieces[i].extend(row)
    assert pieces == got


@pytest.mark.parametrize(
    "controls,message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=CFG.vocab_size + 1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_tokens=[CFG.vocab_size]), "stop token"),
    ],
)
def test_bad_controls_raise_user_error(trained, controls, message):
    decoder = sampling.Decoder(CFG, trained)
    with pytest.raises(UserError, match=message):
        decoder.generate_tokens([encode("the")], **{"max_new_tokens": 5, **controls})


@pytest.mark.parametrize("prompts", [[], [[]], "the"])
def test_bad_prompts_raise_user_error(trained, prompts):
    with pytest.raises(UserError):
        sampling.Decoder(CFG, trained).generate_tokens(prompts, max_new_tokens=5)


def test_load_refuses_a_path_that_is_not_a_run(tmp_path):
    import gptjax

    with pytest.raises(UserError, match="not a gptjax run"):
        gptjax.load(str(tmp_path))
    with pytest.raises(UserError, match="not a gptjax run"):
        gptjax.load(str(tmp_path / "missing"))


def _prefilled_state_shapes(decoder, call):
    """The shapes and dtypes of the decode state a call's prefill returns (what `advance` is
    compiled for), traced as `Decoder._prefill` calls it but not compiled or run."""
    import functools

    from gptjax.sampling import decode
    from gptjax.sampling.plan import left_pad

    b = len(call.prompts)
    tokens_BxP, mask_BxP = left_pad(call.prompts, call.p_len)
    args = (decoder.decode_params, tokens_BxP, mask_BxP, np.zeros((b, call.n_len), np.int32), np.int32(0),
            np.zeros(b, bool), *call.controls)
    return jax.eval_shape(functools.partial(decode.prefill, s=call.s), *args)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_loop_updates_the_cache_in_place(trained, batch):
    """The compiled decode loop holds no copy of a KV-cache buffer (XLA once copied every one,
    every step, at batch 1)."""
    from gptjax.sampling import decode

    decoder = sampling.Decoder(CFG, trained)
    call = decoder._plan(
        [encode("the quick")] * batch, max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9,
        stop_tokens=(), seed=0, row_keys=None, truncate_prompt=False, chunk=None,
    )
    state = _prefilled_state_shapes(decoder, call)
    cache_shape = state.cache["h_0"]["attn"]["cached_key"].shape
    assert cache_shape == (batch * CFG.n_head, call.s.cache_len, CFG.head_dim)
    hlo = decode.advance.lower(decoder.decode_params, state, np.int32(20), *call.controls, s=call.s).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache_shape)) + "]"
    assert hlo.count(shape) > 0
    assert not [line for line in hlo.splitlines() if " copy(" in line and shape in line.split("copy(")[0]]


@pytest.mark.parametrize("batch", [1, 8])
def test_bfloat16_decode_loop_updates_the_cache_in_place(trained, batch):
    """With a bfloat16 cache the compiled decode loop copies no array the size of a cache buffer,
    in any dtype or layout (XLA's CPU backend once rewrote the whole cache through fp32, copying
    every buffer, every step)."""
    import dataclasses
    import re

    from gptjax.sampling import decode

    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    decoder = sampling.Decoder(cfg, trained)
    call = decoder._plan(
        [encode("the quick")] * batch, max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9,
        stop_tokens=(), seed=0, row_keys=None, truncate_prompt=False, chunk=None,
    )
    state = _prefilled_state_shapes(decoder, call)
    cache_k = state.cache["h_0"]["attn"]["cached_key"]
    assert cache_k.dtype == jnp.bfloat16
    hlo = decode.advance.lower(decoder.decode_params, state, np.int32(20), *call.controls, s=call.s).compile().as_text()
    dims = ",".join(map(str, cache_k.shape))
    assert re.search(rf"bf16\[{dims}\]", hlo)
    ops = re.findall(r"= \w+\[([\d,]*)\]\S* ([\w-]+)\(", hlo)  # (dims, opcode) of array-valued instructions
    assert "dot" in {op for _, op in ops}, "the pattern no longer reads XLA's HLO text"
    assert not [d for d, op in ops if op == "copy" and d and math.prod(map(int, d.split(","))) == cache_k.size]
