"""GPT-2 medium (350M) pretraining, sized for a TPU v5e:2x4 slice (8 chips); bf16 compute, fp32 parameters.

    python -m gptjax.aot --config configs/gpt2_medium.py --topology v5e:2x4   # check the fit first
    python -m gptjax.train --config configs/gpt2_medium.py --workdir gs://BUCKET/gpt2_medium

The data and tokenizer are those of configs/gpt2_124m.py (FineWeb-Edu jsonl shards; its
docstring has the commands that make them). Batch 512 x 1024 tokens per step, as for 124M; the
parameters, AdamW state and gradients (16 bytes per parameter: 5.3 GiB, 0.66 GiB per chip here)
are split over all chips (fsdp), each block's activations are recomputed in the backward pass
(model.remat), and grad_accum=16 micro-batches of 32 sequences make one step. On another slice,
ask `python -m gptjax.aot` for the grad_accum that fits (--config.train.grad_accum).
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "files:data/fineweb-edu-10BT/*.jsonl"
    c.tokenizer.vocab_size = 50257
    c.tokenizer.max_chars = 200_000_000
    c.model.update(
        vocab_size=0, n_layer=24, n_head=16, n_embd=1024, block_size=1024, dropout=0.0, dtype="bfloat16", remat=True
    )
    c.train.update(
        steps=100_000,
        batch_size=512,
        seq_len=1024,
        grad_accum=16,
        eval_every=1000,
        eval_batches=20,
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    )
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, b2=0.95, grad_clip=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
