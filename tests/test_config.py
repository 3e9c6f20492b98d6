"""Config files and command-line overrides."""

import dataclasses

import pytest

from gptjax import config as C
from gptjax.errors import UserError
from gptjax.run_model import model_config


def test_overrides_are_converted_to_the_field_type():
    c = C.base_config()
    C.apply_overrides(
        c,
        C.parse_overrides(
            ["--config.optim.lr=3e-4", "--config.train.steps", "1_000", "--config.model.remat=true", "--config.data.source=files:x.txt"]
        ),
    )
    assert c.optim.lr == 3e-4 and c.train.steps == 1000 and c.model.remat is True and c.data.source == "files:x.txt"
    C.apply_overrides(c, [("train.steps", "2e3")])
    assert c.train.steps == 2000 and isinstance(c.train.steps, int)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optim.lrr=1"], "unknown config field 'optim.lrr'"),
        (["--config.nosection.x=1"], "no section 'nosection'"),
        (["--config.train.steps=ten"], "train.steps expects a int"),
        (["--config.train.steps=1.5"], "train.steps expects a int"),
        (["--config.model.remat=maybe"], "model.remat expects a bool"),
        (["--config.optim=1"], "is a section"),
        (["--workdir=x"], "unrecognised argument"),
        (["--config.train.steps"], "needs a value"),
    ],
)
def test_bad_overrides_say_what_is_allowed(args, message):
    with pytest.raises(UserError, match=message):
        C.apply_overrides(C.base_config(), C.parse_overrides(args))


def test_config_files_load_and_match_the_base_fields():
    for name in ("default", "tiny_shakespeare", "gpt2_124m"):
        c = C.load_config(f"configs/{name}.py")
        C.check_types(c)  # no field a recipe invented, no field of another type


def test_recipe_with_an_unknown_field_is_refused(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from gptjax.config import base_config\ndef get_config():\n    c = base_config()\n    c.train.stepz = 3\n    return c\n")
    with pytest.raises(UserError, match="unknown config field 'train.stepz'"):
        C.check_types(C.load_config(str(path)))


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        C.load_config("configs/nope.py")


def test_json_round_trip():
    c = C.base_config()
    assert C.from_json(C.to_json(c)).to_dict() == c.to_dict()


def test_base_config_defaults_are_the_schemas():
    """base_config() has exactly each section dataclass's fields, with its defaults (model.vocab_size,
    which a GPTConfig must be given, is 0: the tokenizer's), and they validate."""
    c = C.base_config()
    sections = {"": C.TopConfig, **C.schema()}
    assert set(c.keys()) == {f.name for f in dataclasses.fields(C.TopConfig)} | set(C.schema())
    for name, cls in sections.items():
        node = c if not name else c[name]
        fields = dataclasses.fields(cls)
        for f in fields:
            expected = 0 if (name, f.name) == ("model", "vocab_size") else f.default
            assert node[f.name] == expected, (name, f.name)
        if name:
            assert set(node.keys()) == {f.name for f in fields}, name
    parsed = C.sections(c)
    assert (parsed.top, parsed.train, parsed.mesh, parsed.optim) == (C.TopConfig(), C.TrainConfig(), C.MeshConfig(), C.OptimConfig())
    assert model_config(parsed.model, 300).vocab_size == 300
    assert C.to_config(parsed).to_dict() == c.to_dict()  # what a run saves holds every field as given


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "train.steps must be >= 1"),
        ("eval_batches", -1, "train.eval_batches must be >= 0"),
        ("grad_accum", 3, "must be divisible by train.grad_accum=3"),
    ],
)
def test_train_section_validates(field, value, message):
    c = C.base_config()
    c.train[field] = value
    with pytest.raises(UserError, match=message):
        C.sections(c)


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("data", "source", "files:a.txt@x", r"^data.source: weight 'x' in 'files:a.txt@x' is not a number"),
        ("data", "source", "stdlib + ", r"^data.source: 'stdlib \+ ' has an empty term"),
        ("eval", "tasks", "bpb:wiki:a.txt", r"^eval.tasks 'bpb:wiki:a.txt': unknown source kind 'wiki'"),
        ("eval", "tasks", "bpb:files:a@0", r"^eval.tasks 'bpb:files:a@0': 'files:a@0' has all mixture weights zero"),
    ],
)
def test_the_schema_refuses_a_bad_source_naming_its_setting(section, field, value, message):
    """A data source's syntax is checked as its section is parsed (before any work, --dry_run
    too), and the error names the setting that holds it: data.source or the eval task."""
    c = C.base_config()
    c[section][field] = value
    with pytest.raises(UserError, match=message):
        C.sections(c)
