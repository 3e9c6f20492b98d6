"""The GPT-2 124M shape (configs/gpt2_124m.py: its data, width, depth, heads, context, batch and
tokens per step) with today's blocks and optimizer, for a TPU VM or a GPU machine (bf16 compute,
fp32 parameters): rotary positions, RMSNorm, SwiGLU, grouped-query attention (4 key/value
heads for 12 query heads), an untied head, no biases, zero-initialised output projections, Muon
for the hidden matrices and AdamW for the embeddings, head and norms.

    python -m gptjax.train --config configs/modern_124m.py --workdir runs/modern_124m
    python -m gptjax.aot --config configs/modern_124m.py --topology v5e:2x2   # fits? how fast?

Data: as configs/gpt2_124m.py (FineWeb-Edu jsonl shards in data/fineweb-edu-10BT/; its
docstring shows how to make them). The SwiGLU width 2048 (Llama's rule for width 768) gives the
MLP GELU's weight count (3 x 768 x 2048 = 2 x 768 x 3072); the untied head adds 38.6M
parameters (152.7M in all, 114M without the two vocabulary tables). Half of gpt2_124m.py's steps on
the same batch, as the modern recipe needs on the CPU demo (docs/recipes.md); at this scale that
is the recipe's bet, not a measurement. No QK-norm and no soft-capping: the model is the Llama
architecture, which the Llama export writes as is.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "files:data/fineweb-edu-10BT/*.jsonl"
    c.tokenizer.vocab_size = 50257
    c.tokenizer.max_chars = 200_000_000
    c.model.update(vocab_size=0, n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, dtype="bfloat16",
                   position="rope", norm="rmsnorm", mlp="swiglu", n_mlp=2048, n_kv_head=4, tie_embeddings=False,
                   bias=False, zero_init_proj=True)
    c.train.update(
        steps=50_000,
        batch_size=512,
        seq_len=1024,
        grad_accum=1,
        eval_every=1000,
        eval_batches=20,
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    )
    c.optim.update(hidden="muon", muon_lr=0.02, muon_momentum=0.95, lr=6e-4, warmup_steps=500, min_lr_ratio=0.1,
                   weight_decay=0.1, b2=0.95, grad_clip=1.0, no_decay="*ln_*,ln_f/*,wte/*,lm_head/*")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
