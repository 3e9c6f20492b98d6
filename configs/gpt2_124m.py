"""GPT-2 124M pretraining for a TPU VM or a GPU machine (bf16 compute, fp32 parameters).

    python -m gptjax.train --config configs/gpt2_124m.py --workdir runs/gpt2_124m
    python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:2x2   # fits? how fast?

Data: FineWeb-Edu's 10B-token sample as jsonl shards in data/fineweb-edu-10BT/ (TFDS has no
OpenWebText, and its large text corpora need TensorFlow or Beam to prepare). The `hf` command
(huggingface_hub) and pyarrow come with gptjax's dependencies; make the shards once (~28 GB
of parquet; one shard, `--include "sample/10BT/000_00000.parquet"`, is enough to try it):

    hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" \
        --local-dir data/fineweb-edu
    python -c "
    import glob, json, os, pyarrow.parquet as pq
    os.makedirs('data/fineweb-edu-10BT', exist_ok=True)
    for path in sorted(glob.glob('data/fineweb-edu/sample/10BT/*.parquet')):
        out = os.path.join('data/fineweb-edu-10BT', os.path.basename(path)[:-8] + '.jsonl')
        with open(out, 'w') as f:
            for batch in pq.ParquetFile(path).iter_batches(columns=['text']):
                f.writelines(json.dumps({'text': t}) + '\\n' for t in batch.column('text').to_pylist())
    "

Other text works the same way: --config.data.source=files:PATH/*.jsonl (one {"text": ...} per
line), or a TFDS dataset already prepared in array_record format (tfds:NAME, data.tfds_data_dir).

Batch 512 x 1024 tokens (~0.5M tokens per step) as in GPT-2; on a pod slice the batch is split
over the data and fsdp mesh axes, and `grad_accum` trades memory for fewer devices.
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "files:data/fineweb-edu-10BT/*.jsonl"
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
    # HellaSwag (acc, acc_norm as llm.c scores it) at every evaluation; get the file once with
    #   curl -L --create-dirs -o data/hellaswag_val.jsonl https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl
    # or leave it out: --config.eval.tasks=''
    c.eval.tasks = "hellaswag:data/hellaswag_val.jsonl"
    return c
