"""The optax optimizer of a run, built from `config.optim`, with per-parameter rules.

Every parameter gets a label from its path (`h_3/attn/c_attn/kernel`): either `frozen`, or a
learning-rate multiplier plus weight decay on/off. Each label is one `optax.adamw` (or
`optax.adam` where there is no weight decay) over the shared schedule scaled by the
multiplier, combined with `optax.partition` (formerly `multi_transform`). Frozen parameters
get `optax.set_to_zero()` and no optimizer state at all (their slots in the other labels'
states are `MaskedNode`s).

Patterns (`no_decay`, `freeze`, `train_only`, `lr_rules`) are comma-separated. A pattern that
contains one of `. + ( ) | \\ ^ $ { }` is a Python regex, anything else a glob (`*` also
crosses `/`). Either must match a whole parameter path or a whole module path above it, so
`ln_f`, `ln_f/*` and `ln_f/.*` all select both `ln_f/scale` and `ln_f/bias`. Parameter names
never contain a dot, so `h_1[01]/.*` is unambiguous. Commas separate patterns, so a regex
cannot contain one.

Which parameters train:
  - `train_only` and `train_last_blocks` (the last N blocks `h_{L-N}..h_{L-1}` plus `ln_f`)
    name the trainable set (their union); when both are empty everything trains;
  - `freeze` then removes parameters from that set, and so does an lr multiplier of 0.
  The output head is tied to `wte`, so "train the head" means training `wte`.

Learning-rate multipliers (they multiply together):
  - `layer_decay` d: with blocks counted 1..L (`h_i` is block i+1), block k gets d**(L-k), so
    the top block `h_{L-1}` and `ln_f` get 1, `h_0` gets d**(L-1) and the embeddings `wte`
    and `wpe` (layer 0) get d**L. Any other top-level parameter counts as the top (1).
  - `lr_rules` 'pattern=multiplier,...': every matching rule multiplies the parameter's
    multiplier, so rule order does not matter and rules compose with `layer_decay`.

Hidden matrices (`hidden`): with 'muon' the kernels inside the blocks get
`optax.contrib.muon` (see `gptjax.muon`) at `muon_lr` times the same schedule and multipliers,
in labels of their own (`muon/lr_x...`); every other parameter keeps AdamW. Freezing,
`layer_decay`, `lr_rules` and `no_decay` (against `muon_weight_decay`) apply to both.

Gradient clipping (`grad_clip`, by global norm) runs before `optax.partition`; frozen
gradients are zeroed first, so the norm is that of the trainable gradients only.

Schedule, for the update with 0-based index s (the optax count / the trainer's step) of T:
warmup s < W: lr * (s+1) / (W+1); then decay from lr at s = W to `min_lr_ratio * lr` at the
final update s = T-1 ('cosine' or 'linear'; 'constant' stays at lr), and flat after that.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax import muon as muon_lib
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.schema import OptimConfig, parse

FROZEN = "frozen"
_REGEX_CHARS = set(".+()|\\^${}")
_BLOCK = re.compile(r"h_(\d+)")
_EMBEDDINGS = ("wte", "wpe")


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """How one parameter is optimized (a row of the dry-run table)."""

    path: str
    shape: tuple[int, ...]
    label: str
    lr_mult: float  # 0 for frozen parameters
    weight_decay: bool
    trainable: bool
    optimizer: str = "adamw"  # 'adamw', 'muon', or '-' (frozen)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transformation of a run and how it treats each parameter.

    `labels` mirrors the parameter tree (boxed parameters count as leaves, so it is a prefix
    of a boxed tree and the same structure as the unboxed one); `schedule(step)` is the base
    learning rate of update `step` (jit-friendly), which each label scales by its multiplier.
    """

    tx: optax.GradientTransformation
    labels: Any
    schedule: Callable[[Any], jax.Array]
    config: OptimConfig
    total_steps: int
    rows: tuple[ParamRow, ...] = dataclasses.field(repr=False)

    def lr_at(self, step: int) -> float:
        """The base (multiplier 1) learning rate of update `step`, as a Python float."""
        return float(self.schedule(step))

    def describe(self) -> list[ParamRow]:
        """One row per parameter, in tree order."""
        return list(self.rows)


def make_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[Any], jax.Array]:
    """Base learning rate as a function of the 0-based update index (see the module doc)."""
    peak, floor, warmup = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    decay_len = max(1, total_steps - 1 - warmup)

    def schedule(step: Any) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - warmup) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif cfg.schedule == "linear":
            decayed = floor + (peak - floor) * (1.0 - p)
        else:
            decayed = jnp.full_like(s, peak)
        return jnp.where(s < warmup, peak * (s + 1.0) / (warmup + 1.0), decayed)

    return schedule


def make_optimizer(cfg: OptimConfig, params: Any, total_steps: int) -> Optimizer:
    """The optimizer for `params` (arrays, ShapeDtypeStructs or boxed; only paths matter)."""
    total_steps = int(total_steps)
    if total_steps < 1:
        raise UserError(f"the number of training steps must be >= 1, got {total_steps}")
    if cfg.warmup_steps > total_steps:
        raise UserError(
            f"optim.warmup_steps={cfg.warmup_steps} is more than the {total_steps} training steps; "
            "allowed: 0..train.steps"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)
    paths = [_path_str(p) for p, _ in flat]
    shapes = [_shape(x) for _, x in flat]
    rows = _param_rows(cfg, paths, shapes)
    dims = {  # Muon's view of each hidden matrix, by key path (see gptjax.muon)
        jax.tree_util.keystr(p): muon_lib.dimension_numbers(r.path, r.shape, getattr(x, "names", None))
        for (p, x), r in zip(flat, rows)
        if r.optimizer == "muon"
    }
    labels = jax.tree_util.tree_unflatten(treedef, [r.label for r in rows])
    schedule = make_schedule(cfg, total_steps)

    transforms: dict[str, optax.GradientTransformation] = {}
    for r in rows:
        if r.label in transforms:
            continue
        if not r.trainable:
            transforms[r.label] = optax.set_to_zero()
            continue
        mult = r.lr_mult * (cfg.muon_lr / cfg.lr if r.optimizer == "muon" else 1.0)
        lr = schedule if mult == 1.0 else functools.partial(_scaled, schedule, mult)
        if r.optimizer == "muon":
            transforms[r.label] = muon_lib.muon(cfg, lr, r.weight_decay, dims)
        elif r.weight_decay:
            transforms[r.label] = optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
        else:
            transforms[r.label] = optax.adam(lr, cfg.b1, cfg.b2, cfg.eps)
    chain = []
    if cfg.grad_clip > 0:
        if FROZEN in transforms:
            frozen = jax.tree_util.tree_unflatten(treedef, [not r.trainable for r in rows])
            chain.append(optax.masked(optax.set_to_zero(), frozen))
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.partition(transforms, labels))
    return Optimizer(optax.chain(*chain), labels, schedule, cfg, total_steps, tuple(rows))


def check_same_state(optimizer: Optimizer, params: Any, saved: Mapping[str, Any], run_dir: RunDir) -> None:
    """The state `optimizer` keeps has the structure of the one the run's checkpoints were saved
    with (`saved`: the config saved in `run_dir`; `params`: the boxed parameter shapes). A
    changed rule (layer_decay, freeze, lr_rules, ...) changes it; without this check every
    checkpoint would fail to restore and be set aside as unreadable."""
    try:
        before = make_optimizer(parse(OptimConfig, saved["optim"], "optim"), params, saved["train"]["steps"])
    except UserError:  # settings this version no longer takes: the restore itself will tell
        return

    def layout(o: Optimizer) -> tuple[Any, list[tuple[Any, Any]]]:
        state = jax.eval_shape(o.tx.init, nn.meta.unbox(params))
        return jax.tree_util.tree_structure(state), [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]

    if layout(optimizer) != layout(before):
        now, then = dataclasses.asdict(optimizer.config), dataclasses.asdict(before.config)
        diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
        raise UserError(
            f"workdir {run_dir.root!r} holds checkpoints whose optimizer state has another structure than these "
            f"optim settings give (field: (saved, requested) = {diff}); resume with the saved settings "
            f"({run_dir.config}) or use a new --workdir")


def format_param_table(params: Any, optimizer: Optimizer) -> str:
    """A table of how each parameter of `params` is optimized, with totals (for --dry_run)."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]
    rows = optimizer.describe()
    if [_path_str(p) for p, _ in flat] != [r.path for r in rows]:
        raise ValueError("format_param_table: params are not the tree the optimizer was built for")
    n_layer = _n_layer([r.path for r in rows])
    muon = [r for r in rows if r.optimizer == "muon"]
    extra = ("optimizer",) if muon else ()  # the column shows only when the optimizers differ
    table = [("parameter", "shape", "label", "lr x", "decay", "trainable", *extra)]
    for r in sorted(rows, key=lambda r: (_layer(r.path, n_layer), r.path)):  # embeddings, h_0, h_1, ..., ln_f
        table.append(
            (
                r.path,
                "x".join(map(str, r.shape)) or "scalar",
                r.label,
                f"{r.lr_mult:.6g}",
                "yes" if r.weight_decay else "no",
                "yes" if r.trainable else "no",
                *([r.optimizer] if muon else []),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sizes = [math.prod(r.shape) for r in rows]
    trainable = sum(n for n, r in zip(sizes, rows) if r.trainable)
    n_trainable = sum(r.trainable for r in rows)
    total = sum(sizes)
    c = optimizer.config
    lines += [
        "",
        f"trainable: {trainable:,} parameters in {n_trainable} tensors ({100.0 * trainable / max(total, 1):.1f}%)",
        f"frozen:    {total - trainable:,} parameters in {len(rows) - n_trainable} tensors",
        f"total:     {total:,} parameters; {len({r.label for r in rows})} labels",
        f"schedule:  {c.schedule}, peak lr {c.lr:g} after {c.warmup_steps} warmup steps, "
        f"{optimizer.lr_at(optimizer.total_steps - 1):.6g} at the final step {optimizer.total_steps - 1}",
    ]
    if muon:
        lines.append(
            f"muon:      {sum(math.prod(r.shape) for r in muon):,} parameters in {len(muon)} tensors (the hidden "
            f"matrices), peak lr {c.muon_lr:g}, momentum {c.muon_momentum:g}, weight decay {c.muon_weight_decay:g}; "
            "the rest AdamW"
        )
    return "\n".join(lines)


# -- labels ----------------------------------------------------------------------------------


def _param_rows(cfg: OptimConfig, paths: list[str], shapes: list[tuple[int, ...]]) -> list[ParamRow]:
    """Decide each parameter's label, multiplier, weight decay and trainability."""
    # The default patterns name every kind of parameter GPT-2 has; a model without biases or
    # learned positions (e.g. an imported Llama) lacks some of them, which is no user's mistake.
    no_decay = _matches(paths, "no_decay", _split(cfg.no_decay), required=cfg.no_decay != OptimConfig.no_decay)
    n_layer = _n_layer(paths)

    trainable = [True] * len(paths)
    if cfg.train_only or cfg.train_last_blocks:
        if cfg.train_last_blocks > n_layer:
            raise UserError(
                f"optim.train_last_blocks={cfg.train_last_blocks} but the model has {n_layer} blocks; "
                f"allowed: 0..{n_layer}"
            )
        picked = _matches(paths, "train_only", _split(cfg.train_only))
        first = n_layer - cfg.train_last_blocks
        trainable = [
            hit or (cfg.train_last_blocks > 0 and _layer(p, n_layer) > first) for p, hit in zip(paths, picked)
        ]
    frozen = _matches(paths, "freeze", _split(cfg.freeze))
    trainable = [t and not f for t, f in zip(trainable, frozen)]

    mults = [cfg.layer_decay ** (n_layer - _layer(p, n_layer)) for p in paths]
    for pattern, mult in _parse_rules(cfg.lr_rules):
        for i, hit in enumerate(_matches(paths, "lr_rules", [pattern])):
            if hit:
                mults[i] *= mult
    mults = [float(f"{m:.12g}") for m in mults]  # one label for multipliers equal up to rounding

    rows = []
    for path, shape, train, mult, nd in zip(paths, shapes, trainable, mults, no_decay):
        if train and mult > 0:
            is_muon = cfg.hidden == "muon" and muon_lib.is_hidden_matrix(path, shape)
            decay = (cfg.muon_weight_decay if is_muon else cfg.weight_decay) > 0 and not nd
            label = ("muon/" if is_muon else "") + f"lr_x{mult:.12g}" + ("" if decay else "/no_decay")
            rows.append(ParamRow(path, shape, label, mult, decay, True, "muon" if is_muon else "adamw"))
        else:
            rows.append(ParamRow(path, shape, FROZEN, 0.0, False, False, "-"))
    if paths and not any(r.trainable for r in rows):
        raise UserError(
            f"every parameter is frozen (optim.freeze={cfg.freeze!r}, optim.train_only={cfg.train_only!r}, "
            f"optim.train_last_blocks={cfg.train_last_blocks}, optim.lr_rules={cfg.lr_rules!r}); "
            "leave at least one parameter trainable"
        )
    return rows


def _n_layer(paths: list[str]) -> int:
    """The number of blocks: one more than the largest i of a top-level `h_i`."""
    blocks = [int(m.group(1)) for p in paths if (m := _BLOCK.fullmatch(p.split("/")[0]))]
    return max(blocks) + 1 if blocks else 0


def _layer(path: str, n_layer: int) -> int:
    """Layer number: 0 for the embeddings, i+1 for block h_i, n_layer for the rest (ln_f)."""
    top = path.split("/")[0]
    if top in _EMBEDDINGS:
        return 0
    m = _BLOCK.fullmatch(top)
    return int(m.group(1)) + 1 if m else n_layer


def _split(text: str) -> list[str]:
    if not isinstance(text, str):
        raise UserError(f"optim patterns must be a comma-separated string, got {text!r}")
    return [p.strip() for p in text.split(",") if p.strip()]


def _parse_rules(text: str) -> list[tuple[str, float]]:
    """'pattern=multiplier,...' -> [(pattern, multiplier)]."""
    rules = []
    for item in _split(text):
        pattern, sep, value = item.rpartition("=")
        try:
            mult = float(value)
        except ValueError:
            mult = float("nan")
        if not sep or not pattern.strip() or not math.isfinite(mult):
            raise UserError(
                f"optim.lr_rules item {item!r} is malformed; allowed: 'pattern=multiplier' items "
                "separated by commas, e.g. 'wte=0.1,h_0/*=0.5'"
            )
        if mult < 0:
            raise UserError(f"optim.lr_rules multiplier in {item!r} is negative; allowed: >= 0 (0 freezes)")
        rules.append((pattern.strip(), mult))
    return rules


def _matches(paths: list[str], field: str, patterns: list[str], required: bool = True) -> list[bool]:
    """Which paths any of `patterns` selects; a pattern that selects nothing is an error (unless not `required`)."""
    hits = [False] * len(paths)
    for pattern in patterns:
        regex = _compile(field, pattern)
        found = False
        for i, path in enumerate(paths):
            parts = path.split("/")
            if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                hits[i] = found = True
        if not found and required:
            examples = ", ".join(_examples(paths))
            raise UserError(
                f"optim.{field} pattern {pattern!r} matches no parameter; parameter paths look like "
                f"{examples} (globs such as 'h_0/*' or regexes such as 'h_1[01]/.*')"
            )
    return hits


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    if not _REGEX_CHARS & set(pattern):
        return re.compile(fnmatch.translate(pattern))
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"optim.{field} pattern {pattern!r} is not a valid regex ({e})") from None


def _examples(paths: list[str]) -> list[str]:
    """A few representative paths: the first, a block's, and the last."""
    picks = [paths[0]] if paths else []
    picks += [p for p in paths if p.startswith("h_0/")][:2] + paths[-1:]
    return list(dict.fromkeys(picks))


# -- trees -----------------------------------------------------------------------------------


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _shape(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, nn.Partitioned):
        leaf = leaf.value
    elif _is_boxed(leaf):
        leaf = leaf.unbox()
    return tuple(leaf.shape)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _scaled(schedule: Callable[[Any], jax.Array], mult: float, step: Any) -> jax.Array:
    return mult * schedule(step)
