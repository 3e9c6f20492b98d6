"""HellaSwag-format multiple choice against a reference written here with transformers, as
llm.c's dev/data/hellaswag.py scores it, for a tiny random GPT-2 converted to gptjax."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax import hf  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.evaluate.multiple_choice import MultipleChoice, read_items  # noqa: E402
from gptjax.evaluate.scoring import Scorer  # noqa: E402
from gptjax.model import GPTConfig  # noqa: E402
from hf_fixtures import build_hf_dir  # noqa: E402

CONTEXTS = ["A man is sitting on a roof. He", "def f(x):\n    return", "Hello, world! The quick brown fox",
            "numbers 1234567890 3.14159", "line one\nline two\n", "Ünïcödé: naïve café,", "The dog", "x"]
ENDINGS = ["is using wrap to wrap a pair of skis.", "x ** 2  # code", "jumps over the lazy dog.", "-42 1e-5",
           "after blank lines", "日本語のテキスト", "a", "starts pulling up roofing on a roof.", "they're", "emoji 🙂"]


def llm_c_reference(model, tokenizer, items):
    """llm.c's hellaswag.py evaluate(), on the items: (sum of the ending's token losses, and
    their mean) per ending, and acc, acc_norm."""
    correct = correct_norm = 0
    sums = []
    for item in items:
        ctx_tokens = tokenizer.encode(item["ctx"])
        rows = [ctx_tokens + tokenizer.encode(" " + end) for end in item["endings"]]
        masks = [[0] * len(ctx_tokens) + [1] * (len(r) - len(ctx_tokens)) for r in rows]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            tokens[i, : len(r)], mask[i, : len(m)] = torch.tensor(r), torch.tensor(m)
        with torch.no_grad():
            logits = model(tokens).logits
        losses = torch.nn.functional.cross_entropy(
            logits[..., :-1, :].reshape(-1, logits.size(-1)), tokens[..., 1:].reshape(-1), reduction="none"
        ).view(tokens.size(0), -1)
        shift_mask = mask[..., 1:]
        sum_loss = (losses * shift_mask).sum(dim=1)
        avg_loss = sum_loss / shift_mask.sum(dim=1)
        correct += int(sum_loss.argmin().item() == item["label"])
        correct_norm += int(avg_loss.argmin().item() == item["label"])
        sums += sum_loss.tolist()
    return sums, correct / len(items), correct_norm / len(items)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_dir(str(tmp_path_factory.mktemp("hf")), vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)


def _items(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"ctx": CONTEXTS[i % len(CONTEXTS)], "endings": list(rng.choice(ENDINGS, 4, replace=False)),
             "label": int(rng.integers(0, 4)), "ind": i} for i in range(n)]


def test_acc_and_acc_norm_match_llm_c_scored_with_transformers(hf_dir, tmp_path):
    items = _items(24)
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    reference_tok = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    want_sums, want_acc, want_norm = llm_c_reference(model, reference_tok, items)

    fields, params, tok = hf.load_hf_dir(hf_dir)
    gpt = GPTConfig(**fields)
    task = MultipleChoice(read_items(str(path)), tok, gpt.block_size)
    scorer = Scorer(gpt, params, batch_size=16)
    got = task.evaluate(scorer)
    logps = [lp for lp, _ in scorer.loglikelihoods(task.requests)]
    np.testing.assert_allclose(-np.array(logps), want_sums, rtol=1e-4, atol=1e-4)
    assert (got["acc"], got["acc_norm"], got["items"]) == (want_acc, want_norm, 24)
    assert 0 < got["acc"] < 1 and got["acc"] != got["acc_norm"]  # the items tell the two apart


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b"], "label": 0}', "at least 2 strings"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "index into endings"),
    ('{"ctx": 3, "endings": ["b", "c"], "label": 0}', "'ctx' must be a string"),
    ("not json", "line 1: not valid JSON"),
])
def test_bad_items_are_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        read_items(str(path))
