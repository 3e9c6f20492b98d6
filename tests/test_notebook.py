"""notebooks/sampling.ipynb runs top to bottom (training its own tiny model, briefly)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_notebook_executes(monkeypatch):
    # The path without a checkpoint, kept short: 10 steps train, evaluate and checkpoint the
    # model as 150 do (the cells after it check what a model does, not how well it writes).
    monkeypatch.setenv("GPTJAX_NOTEBOOK_TRAIN_STEPS", "10")
    monkeypatch.delenv("GPTJAX_CHECKPOINT", raising=False)
    # One CPU device, as a user's notebook has (no simulated devices); the suite's cheaper XLA
    # backend compiles (conftest.FAST_COMPILE) hold in the kernel and in its training run too.
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sampling.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("greedy", "top-k 20", "top-p 0.9"):
        assert f"=== {name}" in outputs
    assert "tokens (context window 128)" in outputs  # generated past the window
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
