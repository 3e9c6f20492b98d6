"""GPT-2 xl (1.5B) pretraining, sized for a TPU v5e:4x8 slice (32 chips); bf16 compute, fp32 parameters.

    python -m gptjax.aot --config configs/gpt2_xl.py --topology v5e:4x8   # check the fit first
    python -m gptjax.train --config configs/gpt2_xl.py --workdir gs://BUCKET/gpt2_xl

The data and tokenizer are those of configs/gpt2_124m.py (FineWeb-Edu parquet files, GPT-2's tokenizer; its
docstring has the commands that fetch them). Batch 512 x 1024 tokens per step, as for 124M; the
parameters, AdamW state and gradients (16 bytes per parameter: 23.2 GiB, 0.72 GiB per chip here)
are split over all chips (fsdp), each block's activations are recomputed in the backward pass
(model.remat), and grad_accum=16 micro-batches of 32 sequences make one step. The 48 blocks run
as one scan (model.scan_layers), so the step compiles in about the time of a shallow model's;
unrolled, the AOT check had not finished compiling it after 30 minutes on a 2-core machine.
The smallest slice that holds it is v5e:2x2 (4 chips), at micro-batches of 8:
--config.train.grad_accum=64 (13.43 GiB of 16 per chip in the AOT check). On another slice, ask
`python -m gptjax.aot` for the grad_accum that fits (--config.train.grad_accum).
"""

import os

from gptjax.config import load_config


def get_config():
    """The 124M recipe (data, tokenizer, schedule, fsdp mesh) at this model's shape."""
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_124m.py"))
    # head_loss "xla", not the 124M recipe's kernel: its recomputed logits add FLOPs to a step
    # that is compute-bound at this width (docs/tpu.md).
    c.model.update(n_layer=48, n_head=25, n_embd=1600, remat=True, scan_layers=True, head_loss="xla")
    c.train.grad_accum = 16
    c.optim.lr = 2e-4
    return c
