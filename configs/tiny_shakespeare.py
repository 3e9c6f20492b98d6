"""Character-rich Shakespeare from TFDS (`tiny_shakespeare`, ~1 MB), nanoGPT's classic first run.

    python -m gptjax.train --config configs/tiny_shakespeare.py      # in runs/tiny_shakespeare

TFDS downloads and prepares the dataset on first use (array_record format; no TensorFlow
needed), or reads it from --config.data.tfds_data_dir when it is already prepared there.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:tiny_shakespeare"
    c.data.tfds_feature = "text"
    c.data.tfds_split = "train"
    c.data.tfds_val_split = "validation"
    c.tokenizer.vocab_size = 1024
    c.model.update(n_layer=6, n_head=6, n_embd=192, block_size=256, dropout=0.1)
    c.train.update(steps=3000, batch_size=32, seq_len=256, eval_every=250, checkpoint_every=500)
    c.optim.update(lr=1e-3, warmup_steps=100)
    return c
