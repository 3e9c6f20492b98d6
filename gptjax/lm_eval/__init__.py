"""lm-evaluation-harness for gptjax runs: the `gptjax` model, registered with lm-eval.

    python -m gptjax.lm_eval --model gptjax --model_args workdir=runs/x --tasks hellaswag

Importing this package registers `GptjaxLM` under the name "gptjax" in lm-eval's model
registry, so any lm-eval entry point in the same process can name it (`lm_eval.simple_evaluate(
model="gptjax", model_args="workdir=runs/x", ...)`). lm-eval 0.4.13's own `lm_eval` command
cannot find it: its registry knows only the models listed in `lm_eval.models` and those whose
module was imported, and it reads no entry points or plugins. `python -m gptjax.lm_eval`
(`gptjax.lm_eval.__main__`) is therefore lm-eval's command with this package imported first;
it takes every argument lm-eval's command takes.

    model.py  `GptjaxLM`: loglikelihood, loglikelihood_rolling and generate_until
"""

from gptjax.lm_eval.model import GptjaxLM

__all__ = ["GptjaxLM"]
