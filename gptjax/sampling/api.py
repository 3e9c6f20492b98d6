"""Text in, text out: `load` a run, then `generate` or `stream` strings.

`LoadedModel` wraps a `Decoder` with the run's tokenizer: prompts are encoded (an empty
prompt means the start of a document), the end-of-text token stops a row by default, and
streamed token chunks are turned into text pieces that never split a multi-byte character.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.sampling.decoder import Decoder, Generation


class LoadedModel:
    """A run's config, parameters and tokenizer, ready to generate text.

    `generate(prompts, **controls)` returns one string per prompt (the new text only);
    `generate_tokens` works on token ids. Controls: max_new_tokens, temperature (0 = greedy),
    top_k (0 = off), top_p (1.0 = off), stop_tokens (default: the tokenizer's end-of-text),
    seed, truncate_prompt (cut a prompt longer than the context window to its last tokens).
    """

    def __init__(self, config: Any, params: Any, tokenizer: Any, model_config: GPTConfig | None = None):
        self.config = config
        self.model_config = model_config or GPTConfig.from_config(config.model)
        self.params = params
        self.tokenizer = tokenizer
        self.decoder = Decoder(self.model_config, params)

    def _controls(self, controls: dict[str, Any]) -> dict[str, Any]:
        controls = dict(controls)
        if controls.get("stop_tokens") is None:
            controls["stop_tokens"] = (self.tokenizer.eot_id,)
        return controls

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids per prompt; '' becomes the end-of-text token (the start of a document)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a string or a list of strings")
        if not prompts:
            raise UserError("give at least one prompt (a non-empty list)")
        return [self.tokenizer.encode(p) or [self.tokenizer.eot_id] for p in prompts]

    def stream(self, prompts: str | Sequence[str], chunk: int = 16, **controls: Any) -> Iterator[tuple[list[str], Generation]]:
        """Yield (new text per row since the last yield, result so far) every `chunk` tokens.

        Bad controls or prompts raise here, before the first token is asked for.
        """
        tokens = self.decoder.stream(self.encode(prompts), chunk=chunk, **self._controls(controls))
        return self._texts(tokens)

    def _texts(self, tokens: Iterator[tuple[list[list[int]], Generation]]) -> Iterator[tuple[list[str], Generation]]:
        decoded: list[list[int]] = []
        shown: list[str] = []
        for new_rows, result in tokens:
            if not decoded:
                decoded, shown = [[] for _ in new_rows], [""] * len(new_rows)
            pieces = []
            for i, row in enumerate(new_rows):
                decoded[i].extend(row)
                text = self.tokenizer.decode(decoded[i])
                # Until a row has ended, hold back a trailing replacement character (a
                # multi-byte character split between chunks); if decoding more tokens changed
                # text already shown, continue from the common prefix.
                stable = text if result.finished or result.stopped[i] else text.rstrip("\ufffd")
                common = os.path.commonprefix([shown[i], stable])
                pieces.append(stable[len(common):])
                shown[i] = stable
            yield pieces, result

    def generate_tokens(self, prompts: Sequence[Sequence[int]], **controls: Any) -> list[list[int]]:
        """New token ids per prompt (lists of ids); the stop token is not included."""
        return self.decoder.generate_tokens(prompts, **self._controls(controls)).tokens

    def generate(self, prompts: str | Sequence[str], **controls: Any) -> list[str]:
        """New text per prompt, cut at the first stop token."""
        result = self.decoder.generate_tokens(self.encode(prompts), **self._controls(controls))
        return [self.tokenizer.decode(t) for t in result.tokens]


def load(path: str, device: jax.Device | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """Load a workdir or one of its checkpoint step directories (local, or a gs:// URL) for sampling.

    The parameters go to `device` (default: the default backend's first device), whatever
    mesh the run was trained on; or, with `mesh`, are split over its devices by the training
    rules (`gptjax.sharding.RULES`: tensor-parallel over `tensor`, over `fsdp` along the width),
    for a model bigger than one chip. They are read on the host first, then placed.
    """
    from gptjax.checkpoint_read import load_for_inference
    from gptjax.layout import find_run
    from gptjax.tokenizer import load_tokenizer, tokenizer_saved

    if device is not None and mesh is not None:
        raise UserError("give load() a device or a mesh, not both")
    run, _ = find_run(str(path))
    if not tokenizer_saved(run.tokenizer):
        raise UserError(f"{run.root!r} has no tokenizer directory; is it a gptjax run?")
    host = jax.devices("cpu")[0] if mesh is not None else device or jax.devices()[0]
    config, params = load_for_inference(str(path), device=host)
    model_config = GPTConfig.from_config(config.model)
    if mesh is not None:
        params = place_on_mesh(model_config, params, mesh)
    return LoadedModel(config, params, load_tokenizer(run.tokenizer), model_config)


def place_on_mesh(cfg: GPTConfig, params: Any, mesh: Mesh) -> Any:
    """The parameters split over `mesh` as training splits them (their logical axis names
    through `gptjax.sharding.RULES`); a width a mesh axis does not divide is a UserError."""
    from gptjax import sharding
    from gptjax.state import param_shapes

    shardings = sharding.logical_shardings(mesh, param_shapes(cfg, boxed=True))
    for path, x, s in zip(*_flat(param_shapes(cfg)), jax.tree_util.tree_leaves(shardings)):
        for dim, axes in zip(x.shape, s.spec):
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
            if dim % size:
                raise UserError(f"parameter {path} has {dim} along an axis split {size} ways by the mesh {dict(mesh.shape)}")
    return jax.device_put(params, shardings)


def _flat(tree: Any) -> tuple[list[str], list[Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves], [x for _, x in leaves]
