"""The built-in CPU demo (configs/default.py: its data, width, depth, batch and tokens per step)
trained the modern way: Muon for the hidden matrices, AdamW for the rest.

    python -m gptjax.train --config configs/modern.py --workdir runs/modern
    python tools/compare_recipes.py          # against the GPT-2 recipe: steps and time to its loss
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.train.update(steps=1000)
    c.optim.update(hidden="muon", muon_lr=0.02, lr=3e-3, warmup_steps=50)
    return c
