"""GPT-2 124M pretraining for a TPU VM or a GPU machine (bf16 compute, fp32 parameters).

    python -m gptjax.train --config configs/gpt2_124m.py --workdir runs/gpt2_124m
    python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:2x2   # fits? how fast?

Data: FineWeb-Edu's 10B-token sample, its parquet files read as downloaded; tokenizer: GPT-2's
byte-level BPE (50,257 ids), so the validation loss reads against llm.c's and modded-nanogpt's
(see docs/data.md). Download both once (~28 GB; `--include "sample/10BT/000_00000.parquet"`
fetches one shard, enough to try it):

    hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" --local-dir data/fineweb-edu
    hf download openai-community/gpt2 tokenizer.json --local-dir data/gpt2

Other data works the same way: --config.data.source=files:PATH/*.jsonl (or .parquet, .txt), or
hf:ORG/NAME for a Hugging Face dataset; every core of every host tokenizes it.

Batch 512 x 1024 tokens (~0.5M tokens per step) as in GPT-2, in 8 micro-batches of 64 rows (the
largest that fits a v5e:2x2, by the AOT check); on a pod slice the batch is split over the data
and fsdp mesh axes, and a larger slice can take fewer micro-batches (--config.train.grad_accum).
"""

from gptjax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "files:data/fineweb-edu/sample/10BT/*.parquet"
    c.tokenizer.path = "data/gpt2/tokenizer.json"
    c.tokenizer.vocab_size = 50257  # GPT-2's; also the size trained to with --config.tokenizer.path=''
    # attention "auto": the splash kernel on a TPU, cuDNN's on a GPU; the embedding padded to
    # 50,304 rows (a multiple of 128) for the accelerators' matmul tiles: same tokens, faster matmuls.
    # activation_dtype: the MLP's hidden pre-activation kept (and saved for the backward) in bf16,
    # the block's largest activation: 4.74 -> 4.37 MB of HBM per token per chip on v5e:2x2.
    # logits_chunk_mib: the head's cross entropy in 2 chunks of 8,192 tokens per chip on v5e:2x2,
    # not 4 of 4,096 (the table and its gradient re-read half as often): 4.23 -> 4.11 MB, +1.15 GiB.
    # collective_matmul=False: each weight gradient one matmul and one reduce-scatter, not the
    # TPU compiler's windowed einsums that re-read the activation per window: 3.98 -> 3.31 MB.
    # head_loss "auto": on a TPU the head's cross entropy by Pallas kernels that keep each logits
    # tile on chip (the chunks above are then the GPU's): 3.32 -> 2.49 MB per token per chip on
    # v5e:2x2, where it costs roofline MFU (99% -> 91%, compute-bound: the kernels recompute the
    # logits; --config.model.head_loss=xla for a v5e run), 3.35 -> 2.47 MB on v6e:2x2 (46% -> 62%).
    c.model.update(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, dtype="bfloat16",
                   attention="auto", vocab_multiple=128, activation_dtype="bfloat16", logits_chunk_mib=2048,
                   head_loss="auto", collective_matmul=False)
    c.train.update(
        steps=100_000,
        batch_size=512,
        seq_len=1024,
        grad_accum=8,  # micro-batches of 64 rows: what fits a v5e:2x2 (python -m gptjax.aot)
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
