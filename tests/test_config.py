"""Config files and command-line overrides."""

import pytest

from gptjax import config as C
from gptjax.errors import UserError


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
