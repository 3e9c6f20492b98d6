"""The prepare stage of a run (`gptjax.prepare`) reads each eval task's input once, in task order:
a multiple-choice file's items, and a bpb source tokenized in the same pass as the run's own
data, with the run's tokenizer; a bpb source that names no files is refused before any data
is tokenized, leaving no workdir behind."""

import json

import jax
import pytest
from fixtures.make_old_run import small_config, write_corpus

from gptjax.errors import UserError
from gptjax.prepare import prepare
from gptjax.run import resolve


def test_prepare_reads_each_eval_input_once_in_task_order(tmp_path):
    corpus = write_corpus(str(tmp_path / "corpus"))
    other = write_corpus(str(tmp_path / "other"))
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps({"ctx": f"def f{i}(", "endings": ["alpha):", "beta):"], "label": i % 2}) + "\n"
                          for i in range(3)))
    c = small_config(corpus)
    c.eval.tasks = f"bpb:files:{other}; hellaswag:{hs}"
    c.eval.max_items = 2
    r = prepare(resolve(c, str(tmp_path / "run"), devices=jax.devices()[:1]))
    dataset, items = r.eval_inputs
    assert [item.label for item in items] == [0, 1]
    assert dataset.sources == [f"files:{other}"] and r.dataset.sources == [f"files:{corpus}"]
    assert dataset.tokenizer is r.tokenizer and r.dataset.tokenizer is r.tokenizer
    assert dataset.val_tokens > 0


def test_a_bpb_source_without_files_is_refused_before_any_data_is_tokenized(tmp_path):
    c = small_config(write_corpus(str(tmp_path / "corpus")))
    c.eval.tasks = f"bpb:files:{tmp_path}/none/*.txt"
    with pytest.raises(UserError, match="matches no files"):
        prepare(resolve(c, str(tmp_path / "run"), devices=jax.devices()[:1]))
    assert not (tmp_path / "run").exists()
