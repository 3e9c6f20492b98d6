"""The built-in CPU demo (configs/default.py: its data, width, depth, heads, context, batch and
tokens per step) with today's blocks and optimizer: rotary positions, RMSNorm, SwiGLU,
grouped-query attention, an untied head, no biases and zero-initialised output projections,
Muon for the hidden matrices and AdamW for the rest. It reaches the GPT-2 recipe's final
validation loss in half its steps (docs/recipes.md; `tools/compare_recipes.py` measures it).

    python -m gptjax.train --config configs/modern.py --workdir runs/modern
    python tools/compare_recipes.py          # against configs/default.py: steps and time to its loss

No QK-norm and no logit soft-capping, so the model is the Llama architecture exactly. The
SwiGLU width (384, 3 x 128 x 384 weights) keeps the MLP's cost near GELU's 4x (2 x 128 x 512).
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.model.update(position="rope", norm="rmsnorm", mlp="swiglu", n_mlp=384, n_kv_head=2, tie_embeddings=False,
                   bias=False, zero_init_proj=True)
    c.train.update(steps=500)
    # No biases or learned positions to match; norms, embeddings and the head without weight decay.
    c.optim.update(hidden="muon", muon_lr=0.02, lr=3e-3, warmup_steps=20, no_decay="*ln_*,ln_f/*,wte/*,lm_head/*")
    return c
