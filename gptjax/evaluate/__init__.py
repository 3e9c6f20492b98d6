"""What a model learned, beyond its own validation loss.

    scoring.py          `Scorer`: log-likelihoods of continuations, batched on a mesh (the
                        function lm-eval's `loglikelihood` needs, and multiple choice's)
    bpb.py              bits per byte: the UTF-8 bytes of the text evaluation batches score,
                        and a data source's validation loss, perplexity and bits per byte
    rolling.py          whole documents in lm-eval's rolling windows (its bits_per_byte)
    multiple_choice.py  HellaSwag-format jsonl (ctx, endings, label): acc and acc_norm as
                        llm.c's hellaswag.py computes them
    tasks.py            the `eval` config section's tasks, run during training
    cli.py              `python -m gptjax.eval`
"""
