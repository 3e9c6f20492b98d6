"""Fine-tune a pretrained GPT-2 on news text with layer-wise learning-rate decay.

    # the Hugging Face files (config.json, model.safetensors, vocab.json, merges.txt) in ./gpt2
    python -m gptjax.train --config configs/gpt2_finetune_news.py      # in runs/gpt2_finetune_news

By default the text is TFDS `ag_news_subset` (feature `description`). Offline, on your own
articles in a jsonl file with one {"text": ...} per line:

    python -m gptjax.train --config configs/gpt2_finetune_news.py \
        --config.data.source=files:my_news.jsonl

The model shape and the GPT-2 tokenizer come from the imported checkpoint. The top block
learns at optim.lr and each block below at layer_decay times the rate of the one above it;
the embeddings get lr * layer_decay ** n_layer.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.init_from = "hf:gpt2"
    c.data.source = "tfds:ag_news_subset"
    c.data.tfds_feature = "description"
    c.data.tfds_split = "train"
    c.data.tfds_val_split = "test"
    c.data.text_field = "text"
    c.model.update(dropout=0.1, dtype="float32")
    c.train.update(
        steps=2000,
        batch_size=16,
        seq_len=256,
        grad_accum=2,
        eval_every=200,
        eval_batches=8,
        log_every=10,
        checkpoint_every=500,
    )
    c.optim.update(lr=1e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, layer_decay=0.8)
    return c
