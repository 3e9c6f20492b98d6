"""`GptjaxLM`: a gptjax run as an lm-evaluation-harness model ("gptjax" in its registry).

Model arguments (`--model_args key=value,...`):
    workdir     a run directory, or one of its checkpoints/<step> directories (local or gs://)
    batch_size  rows per forward pass (lm-eval's --batch_size; "auto": as many as keep a
                pass's fp32 logits under AUTO_LOGITS_BYTES)
    data, fsdp, tensor
                mesh axis sizes (one may be -1; data defaults to -1, the others to 1): given
                any, the parameters are split over all devices as training splits them (a
                model bigger than one chip) and the scoring rows over data x fsdp; without,
                the model runs on the first device
    seed        the sampling seed of generate_until when a task samples (do_sample=True)

Requests become token ids exactly as lm-eval's `hf` model makes them (`TemplateLM`'s
encoding; an empty context is the end-of-text token), so a Hugging Face GPT-2 and its gptjax
import score the same: `loglikelihood` goes through `gptjax.evaluate.scoring.Scorer`;
`loglikelihood_rolling` cuts each text into lm-eval's own rolling windows
(`lm_eval.utils.get_rolling_token_windows`, context_len=1) and sums their scores;
`generate_until` decodes each group of requests with the same generation settings in one
batch with gptjax's sampler (greedy unless the task samples), stopping at the end-of-text
token, and cuts the text at the task's stop strings as lm-eval's `hf` model does.
"""

from __future__ import annotations

from typing import Any

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from gptjax.errors import UserError
from gptjax.evaluate.scoring import Scorer
from gptjax.model.config import GPTConfig

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for tasks that name none
GENERATE_CHUNK = 32  # decode steps between checks for the stop strings
AUTO_LOGITS_BYTES = 2**30  # batch_size=auto: the most fp32 logits one forward pass makes
AUTO_MAX_ROWS = 64
LM_EVAL_EXTRAS = ("max_batch_size", "device")  # what lm-eval's command passes every model; unused here


def _batch_size(value: Any, cfg: GPTConfig) -> int:
    """lm-eval's batch size argument as rows per forward pass ('auto': sized to the logits)."""
    if value is None or str(value).startswith("auto"):
        return max(1, min(AUTO_MAX_ROWS, AUTO_LOGITS_BYTES // (cfg.block_size * cfg.vocab_size * 4)))
    try:
        rows = int(value)
    except (TypeError, ValueError):
        rows = 0
    if rows < 1:
        raise UserError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return rows


@register_model("gptjax")
class GptjaxLM(TemplateLM):
    """A gptjax run for lm-eval (see the module docstring for its arguments)."""

    def __init__(self, workdir: str | None = None, batch_size: Any = None, data: int | None = None,
                 fsdp: int | None = None, tensor: int | None = None, seed: int = 0, **unknown: Any):
        super().__init__()
        from gptjax.sampling.api import load

        unknown = {k: v for k, v in unknown.items() if k not in LM_EVAL_EXTRAS}
        if unknown:
            raise UserError(f"unknown gptjax model argument(s) {sorted(unknown)}; allowed: workdir, batch_size, "
                            "data, fsdp, tensor, seed")
        if not workdir:
            raise UserError("give the run: --model_args workdir=<run directory or checkpoint>")
        mesh = None
        if (data, fsdp, tensor) != (None, None, None):
            from gptjax.sharding import make_mesh

            sizes = {"data": -1 if data is None else data, "fsdp": 1 if fsdp is None else fsdp,
                     "tensor": 1 if tensor is None else tensor}
            mesh = make_mesh(sizes, jax.devices())
        self.workdir = str(workdir)
        self.model = load(self.workdir, mesh=mesh)
        self.seed = int(seed)
        cfg = self.model.model_config
        self.scorer = Scorer(cfg, self.model.params, mesh, _batch_size(batch_size, cfg))

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.model_config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        answers = self.scorer.loglikelihoods([(c, k) for _, c, k in requests], progress=not disable_tqdm)
        out = []
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            texts = self._generate(contexts, requests[indices[0]].args[1])
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """Texts for `contexts` under one request's generation settings, cut at its stop strings."""
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        keep = self.max_length - max_new
        if keep <= 0:
            raise UserError(f"a task asks for {max_new} new tokens, but the context window holds {self.max_length}")
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
        sampled = bool(kwargs.get("do_sample"))
        stream = self.model.decoder.stream(
            prompts,
            max_new_tokens=max_new,
            temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(kwargs.get("top_k") or 0) if sampled else 0,
            top_p=float(kwargs.get("top_p") or 1.0) if sampled else 1.0,
            stop_tokens=(self.eot_token_id,),
            seed=self.seed,
            chunk=GENERATE_CHUNK,
        )
        texts = [""] * len(prompts)
        for _, result in stream:
            texts = [self.tok_decode(t) for t in result.tokens]
            # Every row at its end-of-text token or past a stop string: nothing more is needed.
            if all(s or any(u and u in t for u in until) for s, t in zip(result.stopped, texts)):
                break
        return [postprocess_generated_text(t, until, None) for t in texts]

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.model_config
        return {"model_workdir": self.workdir, "model_num_parameters": cfg.num_params()}
