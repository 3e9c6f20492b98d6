"""notebooks/sampling.ipynb runs top to bottom (training its own tiny model, briefly)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_notebook_executes(monkeypatch):
    monkeypatch.setenv("GPTJAX_NOTEBOOK_TRAIN_STEPS", "30")  # the path without a checkpoint, kept short
    monkeypatch.delenv("GPTJAX_CHECKPOINT", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user's notebook has
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sampling.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("greedy", "top-k 20", "top-p 0.9"):
        assert f"=== {name}" in outputs
    assert "tokens (context window 128)" in outputs  # generated past the window
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
