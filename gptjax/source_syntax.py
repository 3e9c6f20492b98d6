"""The syntax of a data source, `data.source` or an eval task's `bpb:SOURCE`:
'KIND[:ARG][@WEIGHT] + ...', parsed into one `SourceSpec` per term.

The schema checks every source with it when the config is parsed (`gptjax.schema`), so a bad
one is refused before any work; `gptjax.data.sources` reads each spec's documents.
"""

from __future__ import annotations

import dataclasses
import math

from gptjax.errors import UserError

__all__ = ["SOURCE_KINDS", "SourceSpec", "parse_source"]

SOURCE_KINDS = ("stdlib", "files", "tfds", "pairs", "hf")
_SOURCE_HELP = ("allowed: 'stdlib', 'files:GLOB[,GLOB]', 'tfds:NAME', 'pairs:GLOB[,GLOB]', 'hf:NAME[/CONFIG]', "
                "or a mixture like 'files:a/*.txt@3 + stdlib@1'")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One term of `data.source`: kind, argument and mixture weight."""

    kind: str
    arg: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_source(source: str, field: str = "data.source") -> list[SourceSpec]:
    """Parse 'KIND[:ARG][@WEIGHT] + ...' into specs; weights must be >= 0 and not all zero.
    `field` names the setting that holds it in the errors."""
    parts = [p.strip() for p in str(source).split("+")]
    if not all(parts):
        raise UserError(f"{field}: {source!r} has an empty term; {_SOURCE_HELP}")
    specs = []
    for part in parts:
        body, weight = part, 1.0
        if "@" in part:
            body, raw = part.rsplit("@", 1)
            try:
                weight = float(raw)
            except ValueError:
                raise UserError(f"{field}: weight {raw!r} in {part!r} is not a number; "
                                "write SOURCE@WEIGHT, e.g. 'stdlib@2'") from None
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"{field}: weight {raw!r} in {part!r} must be a finite number >= 0")
        kind, _, arg = body.strip().partition(":")
        kind, arg = kind.strip(), arg.strip()
        if kind not in SOURCE_KINDS:
            raise UserError(f"{field}: unknown source kind {kind!r} in {part!r}; {_SOURCE_HELP}")
        if kind == "stdlib" and arg:
            raise UserError(f"{field}: 'stdlib' takes no argument, got {part!r}")
        if kind != "stdlib" and not arg:
            example = "NAME" if kind == "tfds" else "data/*.jsonl"
            raise UserError(f"{field}: {kind!r} needs an argument, e.g. '{kind}:{example}'")
        specs.append(SourceSpec(kind, arg, weight))
    if sum(s.weight for s in specs) <= 0:
        raise UserError(f"{field}: {source!r} has all mixture weights zero; give at least one a weight > 0")
    return specs
