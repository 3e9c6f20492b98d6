"""Convert between a Hugging Face GPT-2 or Llama directory and a gptjax run.

    python tools/convert_hf.py import --hf_dir path/to/gpt2 --out runs/gpt2
    python tools/convert_hf.py export --workdir runs/finetuned --out path/to/hf_dir

Any of these paths may be a gs:// URL.

`import` reads config.json (its model_type says GPT-2 or Llama), model.safetensors and the
tokenizer (never a pickle), checks every tensor against the config, and writes a gptjax run
directory (config.json, tokenizer/, a step-0 checkpoint) that `gptjax.sample` can sample from.
To fine-tune, point training at the Hugging Face directory directly:
`python -m gptjax.train --config.init_from=hf:path/to/gpt2`.

`export` writes the latest checkpoint of a run (or a given `<workdir>/checkpoints/<step>`) as a
directory that transformers loads: `GPT2LMHeadModel` for a GPT-2-shaped model,
`LlamaForCausalLM` for one with RoPE, RMSNorm, SwiGLU and no biases; a model neither format
holds is refused, naming the options. The run's tokenizer goes with it; for a SentencePiece
run `AutoTokenizer` cannot load that tokenizer (see `gptjax.hf`).

Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse

from gptjax import hf
from gptjax.errors import run_cli
from gptjax.model import GPTConfig
from gptjax.tokenizer import Tokenizer, load_tokenizer


def _describe(cfg: GPTConfig, tokenizer: Tokenizer) -> str:
    kv = f" ({cfg.kv_heads} key/value)" if cfg.kv_heads != cfg.n_head else ""
    return (
        f"{cfg.num_params() / 1e6:.2f}M params: {cfg.n_layer} layers, {cfg.n_head} heads{kv}, width {cfg.n_embd}, "
        f"context {cfg.block_size}, vocab {cfg.vocab_size} "
        f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens)"
    )


def import_hf(hf_dir: str, out: str) -> None:
    """Check and load `hf_dir`, then write it as the gptjax run `out` at step 0.

    The run is the base config with `init_from` set to `hf_dir`, resolved as training resolves
    it (model shape and tokenizer from the import); the checkpoint holds the parameters and
    the matching fresh optimizer state, as a training run with that config would have saved
    them before its first step.
    """
    import jax

    from gptjax import checkpoint as ckpt
    from gptjax import config as config_lib
    from gptjax.outputs import save_config
    from gptjax.prepare import prepare
    from gptjax.run import resolve

    out = hf.require_new_dir(out)
    hf_dir = hf.absolute(hf_dir)
    config = config_lib.base_config()
    config.init_from = f"hf:{hf_dir}"
    block_size = hf.read_hf_config(hf_dir)["block_size"]
    config.train.seq_len = min(config.train.seq_len, block_size)  # a run that trains as saved
    run = prepare(resolve(config, out, devices=jax.devices("cpu")[:1]), data=False)
    state = run.steps.state_from_params(run.pretrained)
    save_config(run.run_dir, run.config)
    run.tokenizer.save(run.run_dir.tokenizer)
    checkpointer = ckpt.Checkpointer(run.run_dir, keep=1, async_save=False)
    checkpointer.save(0, state.params, state.opt_state)
    checkpointer.close()
    print(f"wrote {out}: {_describe(run.model, run.tokenizer)}")


def export_hf(workdir: str, out: str) -> None:
    """Write the run's latest (or given) checkpoint and tokenizer as a Hugging Face GPT-2 or Llama directory."""
    from gptjax.checkpoint_read import load_for_inference
    from gptjax.layout import find_run

    hf.require_new_dir(out)
    run_dir, _ = find_run(workdir)
    config, params = load_for_inference(workdir)
    tokenizer = load_tokenizer(run_dir.tokenizer)
    fields = config.model.to_dict()
    model_type = hf.export_hf_dir(fields, params, tokenizer, out)
    print(f"wrote {out}: {hf.FORMATS[model_type].MODEL_CLASS}, {_describe(GPTConfig.from_config(fields), tokenizer)}")
    if tokenizer.kind != "gpt2":
        print(
            f"note: the run's tokenizer is {tokenizer.kind}; {out} holds its model for gptjax and sentencepiece, "
            "but transformers' AutoTokenizer cannot load it"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="Hugging Face GPT-2 or Llama directory -> gptjax run")
    p.add_argument("--hf_dir", required=True, help="directory with config.json, model.safetensors, tokenizer files")
    p.add_argument("--out", required=True, help="the gptjax run directory to create")
    p = sub.add_parser("export", help="gptjax run -> Hugging Face GPT-2 or Llama directory")
    p.add_argument("--workdir", required=True, help="a gptjax run directory or <workdir>/checkpoints/<step>")
    p.add_argument("--out", required=True, help="the Hugging Face directory to create (new or empty)")
    args = parser.parse_args(argv)
    if args.command == "import":
        run_cli(lambda: import_hf(args.hf_dir, args.out))
    else:
        run_cli(lambda: export_hf(args.workdir, args.out))


if __name__ == "__main__":
    from gptjax import runtime

    runtime.cpu_unless_accelerated()  # no TPU backend start-up where no TPU exists (as the CLIs do)
    main()
