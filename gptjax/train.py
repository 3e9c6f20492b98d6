"""`python -m gptjax.train`: train or fine-tune a GPT on a device mesh.

    python -m gptjax.train                                   # the built-in CPU demo
    python -m gptjax.train --config configs/gpt2_124m.py --config.optim.lr=3e-4 --workdir runs/x

Data flow: config -> mesh -> (tokenizer, data) -> params (init or import) + optimizer = train
state, created already sharded -> one jitted train step (explicit shardings, donated state) in
a loop -> evaluation, metrics and checkpoints. Running the same command on the same workdir
resumes from its latest checkpoint and continues the same run: the batch for step s depends
only on (seed, s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from gptjax import checkpoint as ckpt
from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import optim as optim_lib
from gptjax import sharding
from gptjax.errors import UserError, run_cli
from gptjax.model import GPT, GPTConfig


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights); fp32 log-softmax over the vocabulary."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = (logz - target_logit) * weights
    return losses.sum(), weights.sum()


LOGITS_CHUNK_BYTES = 64 * 2**20  # the most fp32 logits head_cross_entropy makes at once


def _seq_chunks(b: int, t: int, vocab: int) -> int:
    """The fewest sequence chunks (a divisor of t) whose fp32 logits fit LOGITS_CHUNK_BYTES."""
    for n in range(1, t + 1):
        if t % n == 0 and b * (t // n) * vocab * 4 <= LOGITS_CHUNK_BYTES:
            return n
    return t


@jax.custom_vjp
def head_cross_entropy(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy` of the tied head's logits `hidden @ embedding.T`, never holding them whole.

    The logits are made a sequence chunk at a time. Under differentiation the forward pass
    also computes each chunk's gradients with respect to `hidden` and `embedding` while the
    chunk is at hand (softmax - one-hot, two matmuls: the FLOPs autodiff would spend), so no
    [batch, seq, vocab] array, nor its gradient or transposed copy, is ever made.
    """
    sums, _, _, _ = _head_ce(hidden, embedding, targets, weights, grads=False)
    return sums


def _head_ce(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array, grads: bool) -> Any:
    b, t, _ = hidden.shape
    vocab = embedding.shape[0]
    n = _seq_chunks(b, t, vocab)
    w = embedding.astype(hidden.dtype)

    def chunk(h: jax.Array, tg: jax.Array, wt: jax.Array) -> Any:
        logits = jnp.einsum("btc,vc->btv", h, w, preferred_element_type=jnp.float32)
        top = logits.max(axis=-1, keepdims=True)
        e = jnp.exp(logits - top)  # one exp pass serves the loss and its gradient
        total = e.sum(axis=-1)
        losses = jnp.log(total) + top[..., 0] - jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
        if not grads:
            return losses, None, None
        # d(loss)/d(logits) = softmax - one_hot, made once; both matmuls read it as it lies.
        onehot = tg[..., None] == jnp.arange(vocab, dtype=tg.dtype)
        dlogits = ((e * (1.0 / total)[..., None] - onehot) * wt[..., None]).astype(hidden.dtype)
        dh = jnp.einsum("btv,vc->btc", dlogits, w, preferred_element_type=jnp.float32)
        if hidden.dtype == jnp.float32:
            # [C, V] = h^T @ dlogits, then one small transpose: measured faster on CPU in fp32.
            dw = jnp.einsum("btc,btv->cv", h, dlogits, preferred_element_type=jnp.float32).T
        else:
            # XLA's CPU runtime folds the transpose above into a bf16 x bf16 -> f32 dot its
            # fallback kernel cannot run ("Unsupported element type for DotThunk"); this
            # orientation stays on its fast path.
            dw = jnp.einsum("btv,btc->vc", dlogits, h, preferred_element_type=jnp.float32)
        return losses, dh, dw

    if n == 1:
        losses, dh, dw = chunk(hidden, targets, weights)
    else:
        split = lambda x: jnp.moveaxis(x.reshape(b, n, t // n, *x.shape[2:]), 1, 0)
        merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, *x.shape[3:])

        def body(acc: jax.Array, xs: Any) -> Any:
            losses, dh, dw = chunk(*xs)
            return (acc + dw if grads else acc), (losses, dh)

        acc = jnp.zeros(embedding.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32)
        dw, (losses, dh) = jax.lax.scan(body, acc, (split(hidden), split(targets), split(weights)))
        losses, dh = merge(losses), (merge(dh) if grads else None)
    return ((losses * weights).sum(), weights.sum()), losses, dh, dw


def _head_ce_fwd(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array) -> Any:
    sums, losses, dh, dw = _head_ce(hidden, embedding, targets, weights, grads=True)
    return sums, (losses, dh.astype(hidden.dtype), dw.astype(embedding.dtype))


def _head_ce_bwd(res: Any, g: tuple[jax.Array, jax.Array]) -> Any:
    losses, dh, dw = res
    g_loss, g_weight = g
    return (g_loss * dh).astype(dh.dtype), g_loss * dw, None, g_loss * losses + g_weight


head_cross_entropy.defvjp(_head_ce_fwd, _head_ce_bwd)


def train_compiler_options(gpt: GPTConfig, mesh: Mesh) -> dict[str, Any] | None:
    """XLA options for the train step.

    With `model.remat` on CPU: the memory-optimized scheduler. XLA's default CPU scheduler
    runs the rematerialized forward ops as early as it can, which keeps their results alive
    as long as without remat (124M, batch 8 x 256, fp32: 3079 MB of temporaries either way;
    with this scheduler 1983 MB).
    """
    if gpt.remat and mesh.devices.flat[0].platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None


class Trainer:
    """The model, optimizer and mesh of a run, and its jitted, sharded functions."""

    def __init__(self, gpt: GPTConfig, optimizer: optim_lib.Optimizer, mesh: Mesh, seed: int, grad_accum: int = 1):
        self.gpt, self.optimizer, self.mesh, self.seed, self.grad_accum = gpt, optimizer, mesh, seed, grad_accum
        self.model = GPT(gpt)
        self.tx = optimizer.tx
        boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.param_shardings = sharding.logical_shardings(mesh, boxed)
        self.abstract_params = nn.meta.unbox(boxed)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = sharding.match_by_path(
            abstract_opt, self.abstract_params, self.param_shardings, sharding.replicated(mesh)
        )
        self.abstract_opt_state = abstract_opt
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh), params=self.param_shardings, opt_state=self.opt_shardings
        )
        self.batch_sharding = sharding.batch_sharding(mesh, ndim=3)
        self.eval_sharding = sharding.batch_sharding(mesh, ndim=2)
        rep = sharding.replicated(mesh)
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=(0,),
            compiler_options=train_compiler_options(gpt, mesh),
        )
        self._eval_step = jax.jit(
            self._eval, in_shardings=(self.param_shardings, self.eval_sharding), out_shardings=(rep, rep)
        )

    # -- state -----------------------------------------------------------------------------

    def _init_boxed(self, rng: jax.Array) -> Any:
        dummy = jnp.zeros((1, min(8, self.gpt.block_size)), jnp.int32)
        return self.model.init(rng, dummy)["params"]

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""

        def init(rng: jax.Array) -> TrainState:
            params = nn.meta.unbox(self._init_boxed(rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        # No mesh context here: flax's DenseGeneral initialises a flat kernel before reshaping
        # it, and a logical constraint on that flat value would not fit; out_shardings places
        # the results.
        return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(self.seed))

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 state around given host parameters (an imported checkpoint)."""
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x, np.float32)[idx]),
            params,
            self.param_shardings,
        )
        with self._context():
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    def abstract(self, tree: Any, shardings: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    # -- steps -----------------------------------------------------------------------------

    def _context(self) -> Any:
        return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES))

    def _loss_sums(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        deterministic = self.gpt.dropout == 0.0
        hidden = self.model.apply(
            {"params": params}, batch["inputs"], deterministic=deterministic, rngs={"dropout": rng}, return_hidden=True
        )
        return head_cross_entropy(hidden, params["wte"]["embedding"], batch["targets"], batch["weights"])

    def _step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step over `grad_accum` micro-batches (batch arrays are [accum, micro, seq]).

        Gradients of the summed token losses are accumulated and divided by the total weight,
        so the update equals that of one big batch whatever the accumulation.
        """
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), state.step)

        def one(mb: Any, r: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
            (loss_sum, weight_sum), grads = jax.value_and_grad(self._loss_sums, has_aux=True)(state.params, mb, r)
            return grads, loss_sum, weight_sum

        if self.grad_accum == 1:
            grads, loss_sum, weight_sum = one(jax.tree_util.tree_map(lambda x: x[0], batch), rng)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                g_acc, l_acc, w_acc = carry
                mb, i = xs
                g, l, w = one(mb, jax.random.fold_in(rng, i))
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, weight_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(self.grad_accum)))
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.optimizer.schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = self.model.apply({"params": params}, batch["inputs"], deterministic=True)
        return cross_entropy(logits, batch["targets"], batch["weights"])

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict[str, jax.Array]]:
        """Run one step on this host's rows of the global batch ([rows, seq] numpy arrays)."""
        with self._context():
            return self._train_step(state, self._to_global(batch, self.batch_sharding, accum=True))

    def evaluate(self, params: Any, batches: Iterable[dict[str, np.ndarray]]) -> float:
        """Mean token loss over the given (host-local) batches."""
        total, count = 0.0, 0.0
        with self._context():
            for batch in batches:
                loss_sum, weight_sum = self._eval_step(params, self._to_global(batch, self.eval_sharding, accum=False))
                total += float(loss_sum)
                count += float(weight_sum)
        return total / max(count, 1.0)

    def _to_global(self, batch: dict[str, np.ndarray], target: NamedSharding, accum: bool) -> dict[str, jax.Array]:
        out = {}
        for key in ("inputs", "targets", "weights"):
            x = np.asarray(batch[key])
            if accum:
                x = x.reshape(self.grad_accum, x.shape[0] // self.grad_accum, *x.shape[1:])
                global_shape = (x.shape[0], x.shape[1] * jax.process_count(), *x.shape[2:])
            else:
                global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[key] = jax.make_array_from_process_local_data(target, x, global_shape)
        return out


class _Both:
    """Enter two context managers as one."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b

    def __enter__(self) -> None:
        self.a.__enter__()
        self.b.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.b.__exit__(*exc)
        self.a.__exit__(*exc)


# -- the run ------------------------------------------------------------------------------------

KNOWN_PEAK_TFLOPS = {  # dense bf16 per device, from vendor datasheets
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on the default device: the peak MFU is measured against."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops(configured_tflops: float, mesh: Mesh) -> float:
    """Peak FLOP/s of the mesh: configured, looked up, or measured on a CPU."""
    device = mesh.devices.flat[0]
    if configured_tflops > 0:
        return configured_tflops * 1e12 * mesh.size
    for name, tflops in KNOWN_PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return tflops * 1e12 * mesh.size
    # CPU (simulated devices share the same cores): one measurement stands for the machine.
    return measure_matmul_flops()


class MetricsWriter:
    """Append metrics to <workdir>/metrics.jsonl and TensorBoard events (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


class _StopRequested:
    """Turn SIGTERM / SIGINT into a flag so the loop can save a checkpoint before it exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def validate(config: config_lib.ConfigDict, devices: list[jax.Device] | None = None) -> tuple[GPTConfig, Mesh]:
    """Check what can be checked before anything is read or written."""
    config_lib.check_types(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    t = config.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
        if t[name] < 1:
            raise UserError(f"train.{name} must be >= 1, got {t[name]}")
    if t.eval_batches < 0:
        raise UserError(f"train.eval_batches must be >= 0, got {t.eval_batches}")
    if t.batch_size % t.grad_accum:
        raise UserError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    micro = t.batch_size // t.grad_accum
    dp = sharding.data_parallel_size(mesh)
    if micro % dp:
        raise UserError(
            f"the micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by the "
            f"data-parallel size data*fsdp = {dp}"
        )
    if micro % jax.process_count():
        raise UserError(f"the micro-batch {micro} must be divisible by the number of hosts {jax.process_count()}")
    if config.model.vocab_size < 0:
        raise UserError(f"model.vocab_size must be >= 0 (0: the tokenizer's), got {config.model.vocab_size}")
    gpt = _gpt_config(config)
    if t.seq_len > gpt.block_size:
        raise UserError(f"train.seq_len={t.seq_len} is longer than model.block_size={gpt.block_size}")
    data_lib.DataConfig.from_config(config.data)
    data_lib.parse_source(config.data.source)
    # Labels depend only on parameter paths: a freeze or lr rule that matches nothing fails here.
    optim_lib.make_optimizer(config.optim, abstract_params(gpt), t.steps)
    return gpt, mesh


def _gpt_config(config: config_lib.ConfigDict, vocab_size: int | None = None) -> GPTConfig:
    """The model config; until the tokenizer is known, vocab_size 0 stands for tokenizer.vocab_size."""
    vocab = vocab_size or config.model.vocab_size or config.tokenizer.vocab_size
    return GPTConfig.from_config({**config.model.to_dict(), "vocab_size": vocab})


def abstract_params(gpt: GPTConfig) -> Any:
    """ShapeDtypeStructs of the parameters (nothing is allocated)."""
    init = lambda: GPT(gpt).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return nn.meta.unbox(jax.eval_shape(init))


def _check_same_shape(config: config_lib.ConfigDict, workdir: str) -> None:
    saved = ckpt.read_run_config(workdir)
    if saved is None:
        return
    if not ckpt.has_checkpoint(workdir):
        return
    mine, theirs = ckpt.model_shape(config), ckpt.model_shape(saved)
    if mine["vocab_size"] == 0:
        mine["vocab_size"] = theirs["vocab_size"]
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise UserError(
            f"workdir {workdir!r} holds a checkpoint of a different model shape "
            f"(field: (saved, requested) = {diff}); use a new --workdir or the saved shape"
        )


def run(
    config: config_lib.ConfigDict,
    workdir: str,
    dry_run: bool = False,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, float]:
    """Train (or resume) the run in `workdir` on `devices` (default: all); return the final metrics.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption
    would; running again continues the same run.
    """
    pretrained = None  # (params, tokenizer) of init_from, read only when starting a new run
    if config.init_from:  # on resume only the shape is read; weights come from the checkpoint
        _, params, tokenizer = _import_pretrained(config, weights=not ckpt.has_checkpoint(workdir))
        pretrained = (params, tokenizer) if params is not None else None
    gpt, mesh = validate(config, devices)
    _check_same_shape(config, workdir)
    t = config.train

    if dry_run:
        params = abstract_params(gpt)
        print(optim_lib.format_param_table(params, optim_lib.make_optimizer(config.optim, params, t.steps)))
        return {}

    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        dataset = data_lib.prepare(config, workdir, tokenizer=pretrained[1] if pretrained else None)
        with config.unlocked():
            if config.model.vocab_size == 0:
                config.model.vocab_size = dataset.tokenizer.vocab_size
        if config.model.vocab_size < dataset.tokenizer.vocab_size:
            raise UserError(
                f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({dataset.tokenizer.vocab_size}); use 0 to take the tokenizer's"
            )
        gpt = _gpt_config(config)
        dataset.check(t.seq_len)
    except UserError:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    optimizer = optim_lib.make_optimizer(config.optim, abstract_params(gpt), t.steps)
    trainer = Trainer(gpt, optimizer, mesh, config.seed, t.grad_accum)
    if jax.process_index() == 0:
        ckpt.save_config(workdir, config_lib.to_json(config))

    checkpointer = ckpt.Checkpointer(workdir, keep=t.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is not None:
        params, opt_state, data_pos = checkpointer.restore(
            start,
            trainer.abstract(trainer.abstract_params, trainer.param_shardings),
            trainer.abstract(trainer.abstract_opt_state, trainer.opt_shardings),
        )
        state = TrainState(step=jnp.asarray(data_pos["step"], jnp.int32), params=params, opt_state=opt_state)
        _log(f"resumed from {os.path.join(checkpointer.directory, str(start))} at step {start}")
    elif pretrained is not None:
        state = trainer.state_from_params(pretrained[0])
        start = 0
    else:
        state = trainer.init_state()
        start = 0

    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = gpt.flops_per_token(t.seq_len) * tokens_per_step
    peak = peak_flops(t.peak_tflops, mesh)
    eval_data = dataset.eval_batches(
        t.batch_size // t.grad_accum, t.seq_len, t.eval_batches, jax.process_index(), jax.process_count()
    )
    writer = MetricsWriter(workdir)
    _log(
        f"model: {gpt.num_params() / 1e6:.2f}M params, {gpt.n_layer} layers, width {gpt.n_embd}; "
        f"mesh {dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s); "
        f"vocab {gpt.vocab_size}; {tokens_per_step} tokens/step"
    )

    def get_batch(step: int) -> dict[str, np.ndarray]:
        return dataset.get_batch(
            step, t.batch_size, t.seq_len, config.seed, jax.process_index(), jax.process_count()
        )

    def save(step: int, state: TrainState) -> None:
        checkpointer.save(step, state.params, state.opt_state, {"step": step, "seed": config.seed, "batches_drawn": step})

    final: dict[str, float] = {}
    last_saved = start
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True, unit="step")
    step = start
    window_start, window_steps = time.perf_counter(), 0
    metrics = None
    with _StopRequested() as stop:
        for step in range(start, t.steps):
            state, metrics = trainer.train_step(state, get_batch(step))
            window_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                m["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                m["mfu"] = flops_per_step * window_steps / elapsed / peak
                writer.write(done, m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
                final.update(m)
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if t.eval_batches and (done % t.eval_every == 0 or done == t.steps):
                val = trainer.evaluate(state.params, eval_data)
                ev = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
                writer.write(done, ev)
                final.update(ev)
                bar.write(f"step {done}: val_loss {val:.4f}  val_ppl {ev['val_ppl']:.2f}")
                window_start = time.perf_counter()
            if done % t.checkpoint_every == 0 or done == t.steps:
                save(done, state)
                last_saved = done
            if stop.requested or done == stop_at:
                break
    bar.close()
    done = int(state.step)
    if done != last_saved:
        save(done, state)
    checkpointer.close()
    writer.close()
    if done < t.steps:
        _log(f"stopped at step {done}; checkpoint saved. Run the same command again to resume.")
    final["step"] = done
    return final


def _import_pretrained(config: config_lib.ConfigDict, weights: bool = True) -> tuple[dict[str, Any], Any, Any]:
    """Read `init_from=hf:DIR`, set the model shape from it, and return (fields, params, tokenizer).

    With weights=False only config.json is read (params and tokenizer are None).
    """
    kind, _, path = config.init_from.partition(":")
    if kind != "hf" or not path:
        raise UserError(f"init_from must be '' or 'hf:/path/to/gpt2-dir', got {config.init_from!r}")
    from gptjax import hf

    if weights:
        fields, params, tokenizer = hf.load_hf_dir(path)
    else:
        fields, params, tokenizer = hf.read_hf_config(os.path.abspath(os.path.expanduser(path))), None, None
    with config.unlocked():
        for k, v in fields.items():
            config.model[k] = v
    return fields, params, tokenizer


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk so a resumed or repeated run skips most compilation.

    JAX_COMPILATION_CACHE_DIR chooses the place (empty: off); the default is ~/.cache/gptjax/xla.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gptjax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.train",
        description="Train or fine-tune a GPT. Any config field can be set with --config.section.field=value.",
    )
    parser.add_argument("--config", default="", help="a config file with get_config() (default: the built-in CPU demo)")
    parser.add_argument("--workdir", default="runs/default", help="run directory: checkpoints, metrics, tokenizer")
    parser.add_argument("--dry_run", action="store_true", help="print the parameter table (labels, learning rates) and exit")
    args, rest = parser.parse_known_args(argv)

    def body() -> None:
        enable_compilation_cache()
        sharding.maybe_initialize_distributed()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        final = run(config, args.workdir, dry_run=args.dry_run)
        if args.dry_run or jax.process_index() != 0:
            return
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss", "val_ppl") if k in final)
        print(f"done: step {final.get('step')}; {summary}")
        print(f"checkpoint: {os.path.abspath(os.path.join(args.workdir, 'checkpoints'))}")
        print(f'sample:     python -m gptjax.sample --workdir {args.workdir} --prompt "def " --max_new_tokens 200')

    run_cli(body)


if __name__ == "__main__":
    main()
