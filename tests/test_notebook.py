"""notebooks/sampling.ipynb runs top to bottom on a given checkpoint, and its training cell's
command (the path taken when none is given) names settings the run accepts."""

import ast
import json
import os

import nbformat
from nbclient import NotebookClient

from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling.ipynb")


def test_sampling_notebook_executes(monkeypatch, trained_run, tmp_path):
    # The shared tiny run (block_size 32) as the checkpoint: the cells after the training cell
    # check what a model does, not how well it writes; the training cell's command is checked
    # below without training.
    monkeypatch.setenv("GPTJAX_CHECKPOINT", trained_run.copy(tmp_path / "run"))
    # One CPU device, as a user's notebook has (no simulated devices); the suite's cheaper XLA
    # backend compiles (conftest.FAST_COMPILE) hold in the kernel too.
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("greedy", "top-k 20", "top-p 0.9"):
        assert f"=== {name}" in outputs
    assert "2 layers, width 32, context 32" in outputs
    assert "tokens (context window 32)" in outputs  # generated past the window
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_the_training_cells_command_names_fields_the_run_accepts():
    """The notebook trains with `python -m gptjax.train` and --config.X=Y overrides when no
    checkpoint is given: each override must set a field of the default config, with a value of
    its type (as the CLI checks before any work)."""
    from gptjax import config as config_lib

    cells = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
             for c in json.load(open(NOTEBOOK))["cells"] if c["cell_type"] == "code"]
    (cell,) = [c for c in cells if '"-m", "gptjax.train"' in c]
    steps = 150
    overrides = []
    for node in ast.walk(ast.parse(cell)):
        if isinstance(node, ast.JoinedStr):  # f"--config.train.steps={TRAIN_STEPS}" and the like
            text = "".join(v.value if isinstance(v, ast.Constant) else str(steps) for v in node.values)
            if text.startswith("--config."):
                overrides.append(text)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--config.") \
                and not node.value.endswith("="):  # not an f-string's first part
            overrides.append(node.value)
    assert len(overrides) == 7, overrides
    config = config_lib.base_config()
    config_lib.apply_overrides(config, config_lib.parse_overrides(overrides))
    sections = config_lib.sections(config)
    assert sections.train.steps == steps and sections.tokenizer.vocab_size == 1024
