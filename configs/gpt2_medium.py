"""GPT-2 medium (350M) pretraining, sized for a TPU v5e:2x2 slice (4 chips); bf16 compute, fp32 parameters.

    python -m gptjax.aot --config configs/gpt2_medium.py --topology v5e:2x2   # check the fit first
    python -m gptjax.train --config configs/gpt2_medium.py --workdir gs://BUCKET/gpt2_medium

The data and tokenizer are those of configs/gpt2_124m.py (FineWeb-Edu parquet files, GPT-2's tokenizer; its
docstring has the commands that fetch them). Batch 512 x 1024 tokens per step, as for 124M; the
parameters, AdamW state and gradients (16 bytes per parameter: 5.3 GiB, 1.32 GiB per chip here)
are split over all chips (fsdp), each block's activations are recomputed in the backward pass
(model.remat), and grad_accum=16 micro-batches of 32 sequences make one step. As configured it
also fits a single chip (v5e:1x1, 15.26 GiB of 16 in the AOT check). On another slice, ask
`python -m gptjax.aot` for the grad_accum that fits (--config.train.grad_accum).
"""

import os

from gptjax.config import load_config


def get_config():
    """The 124M recipe (data, tokenizer, schedule, fsdp mesh) at this model's shape."""
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_124m.py"))
    # head_loss "xla", not the 124M recipe's kernel: its recomputed logits add FLOPs to a step
    # that is compute-bound at this width (docs/tpu.md).
    c.model.update(n_layer=24, n_head=16, n_embd=1024, remat=True, head_loss="xla")
    c.train.grad_accum = 16
    c.optim.lr = 3e-4
    return c
