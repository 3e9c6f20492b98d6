"""GPT-2 124M pretraining for a TPU VM or a GPU machine (bf16 compute, fp32 parameters).

    python -m gptjax.train --config configs/gpt2_124m.py --workdir gs://bucket/gpt2 \
        --config.data.source=tfds:c4/en:3.1.0 --config.mesh.fsdp=-1 --config.mesh.data=1

Batch 512 x 1024 tokens (~0.5M tokens per step) as in GPT-2; on a pod slice the batch is split
over the data and fsdp mesh axes, and `grad_accum` trades memory for fewer devices.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:openwebtext"
    c.tokenizer.vocab_size = 50257
    c.tokenizer.max_chars = 200_000_000
    c.model.update(vocab_size=0, n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, dtype="bfloat16")
    c.train.update(
        steps=100_000,
        batch_size=512,
        seq_len=1024,
        grad_accum=1,
        eval_every=1000,
        eval_batches=20,
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    )
    c.optim.update(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, b2=0.95, grad_clip=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
