"""The recipes in configs/: each loads, passes gptjax's validation (a run resolved without a
workdir: schema, mesh, batch split, model, optimizer rules), has the model size its name says,
and names only TFDS datasets that exist and prepare without Apache Beam (builder construction
only: nothing is downloaded)."""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import pytest

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
GPT2_SIZES = {"gpt2_124m": 124.4e6, "gpt2_medium": 354.8e6, "gpt2_large": 774.0e6, "gpt2_xl": 1557.6e6}
# A TFDS name in code or docs: lower-case, so placeholders like tfds:NAME are not taken for one.
TFDS_NAME = re.compile(r"tfds:([a-z0-9_]+(?:/[a-z0-9_.]+)?(?::[0-9.]+)?)")


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _gpt2_small_dir(root: str) -> str:
    """A directory with only the config.json of Hugging Face GPT-2 small: resolving a run that
    starts from a checkpoint reads the shape from it, not the weights."""
    path = os.path.join(root, "gpt2")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}, f)
    return path


def test_the_recipes_are_found():
    assert set(GPT2_SIZES) <= {_name(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_resolves(path, tmp_path):
    config = config_lib.load_config(path)
    if config.init_from:
        config.init_from = "hf:" + _gpt2_small_dir(str(tmp_path))
    run = run_lib.resolve(config, None, jax.devices())
    assert run.train.batch_size % run.train.grad_accum == 0
    expected = GPT2_SIZES.get(_name(path))
    if expected is not None:
        assert run.model.num_params() == pytest.approx(expected, rel=0.01)
        assert run.model.vocab_size == config.tokenizer.vocab_size == 50257


def _tfds_uses() -> list[tuple[str, str]]:
    uses = []
    for path in CONFIGS:
        with open(path) as f:
            uses += [(_name(path), name) for name in sorted(set(TFDS_NAME.findall(f.read())))]
    return uses


def test_tfds_sources_are_seen():
    """The scan finds the TFDS names a config's data.source uses."""
    for path in CONFIGS:
        config = config_lib.load_config(path)
        for spec in data_lib.parse_source(config.data.source):
            if spec.kind == "tfds":
                assert (_name(path), spec.arg) in _tfds_uses()


@pytest.mark.parametrize("config_name,dataset", _tfds_uses(), ids=lambda x: str(x))
def test_tfds_name_resolves(config_name, dataset, tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=str(tmp_path))
    assert not isinstance(builder, tfds.core.BeamBasedBuilder), f"{dataset} needs Apache Beam to prepare"
    config = config_lib.load_config(os.path.join(ROOT, "configs", config_name + ".py"))
    if config.data.source == f"tfds:{dataset}":
        assert config.data.tfds_feature in builder.info.features
