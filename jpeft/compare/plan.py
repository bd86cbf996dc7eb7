"""What a comparison runs: the `--methods` entries, checked before anything runs, and the list of runs.

Grammar of `--methods`: entries separated by commas; an entry is a registered method name followed by
`:key=value` pairs, each key a flag of that method (`r`, `lora_alpha` or `lora-alpha`, `target_modules`, ...;
a bare `:use_dora` sets a switch) or `lr`, which fixes the learning rate (`lr=1e-3`) or gives the entry its own grid
(`lr=[3e-4,1e-3]`). A value holding commas is bracketed: `lora:r=8:target_modules=[q_proj,v_proj]`.

Every entry's flags are parsed by the same generated parser `jpeft train --method M` uses, and its config is built
and validated, so a method or flag that does not exist, or a value the method refuses, is an error before any
model is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Any

from jpeft.cli_args import add_config_flags, add_quant_flags, config_from_args
from jpeft.errors import ConfigError
from jpeft.methods import catalog

TITLES = {"full": "Full parameter", "lora": "LoRA", "qlora": "QLoRA", "adalora": "AdaLoRA", "sora": "SoRA",
          "vera": "VeRA", "ia3": "IA3", "prefix": "Prefix tuning", "prompt": "Prompt tuning",
          "adapter": "Adapter"}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are ConfigErrors (no usage text, no exit)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One `--methods` entry: the text as given, its method, flags (`--flag value` argv for `jpeft train`) and its
    own learning rates (None: the comparison's grid)."""

    text: str
    method: str
    argv: tuple[str, ...]
    lrs: tuple[float, ...] | None = None

    @property
    def slug(self) -> str:
        """A folder name for the entry (`lora:r=8` -> `lora_r8`)."""
        s = re.sub(r"[^A-Za-z0-9.]+", "_", self.text.replace("=", "")).strip("_")
        return s[:60] or self.method

    @property
    def label(self) -> str:
        """The row name in the seed's style: `LoRA(r=8)`, `Full parameter` (an `lr=` pair is left out)."""
        title = TITLES.get(self.method, self.method)
        pairs = [p for p in self.text.split(":")[1:] if not p.strip().startswith("lr=")]  # the rate has a column
        return f"{title}({', '.join(pairs)})" if pairs else title


def split_entries(text: str) -> list[str]:
    """The entries of `--methods`: commas split them except inside brackets, braces or quotes."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    if any(not e for e in out) or depth or quote:
        raise ConfigError(f"--methods {text!r}: expected entries like full,lora:r=8,qlora:r=8 (unbalanced brackets or "
                          "an empty entry)")
    return out


def _unbracket(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] + value[-1] in ("[]", "''", '""') else value


def parse_lrs(text: str, where: str) -> tuple[float, ...]:
    """`1e-3` or `[3e-4,1e-3]` (or `3e-4,1e-3`) -> learning rates, each finite and > 0."""
    try:
        lrs = tuple(float(x) for x in _unbracket(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a learning rate or a list of them (e.g. 1e-3 or [3e-4,1e-3])") \
            from None
    if not lrs or any(not (math.isfinite(x) and x > 0) for x in lrs):
        raise ConfigError(f"{where}: learning rates must be finite and > 0, got {text!r}")
    return lrs


def method_parser(method: str) -> _Parser:
    """The flags `jpeft train --method <method>` has for the method (its config fields and the 4-bit flags)."""
    spec = catalog.get_method(method)
    p = _Parser(prog=f"--methods {method}", add_help=False, allow_abbrev=False)
    add_config_flags(p, spec.config, spec.config.__name__)
    add_quant_flags(p, spec)
    return p


def _flags(p: argparse.ArgumentParser) -> list[str]:
    return sorted({s for a in p._actions for s in a.option_strings if s.startswith("--")})


def _to_argv(pairs: list[str], entry: str) -> tuple[list[str], tuple[float, ...] | None]:
    argv, lrs = [], None
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--methods entry {entry!r}: empty flag in {pair!r}; write key=value")
        if key == "lr":
            lrs = parse_lrs(value, f"--methods entry {entry!r}: lr")
            continue
        flag = "--" + key.replace("_", "-")
        if not eq:
            argv.append(flag)
        elif value.lower() in ("true", "false") and not key.startswith("no_"):
            argv.append(flag if value.lower() == "true" else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, _unbracket(value)]
    return argv, lrs


def _parsed(text: str) -> tuple[str, list[str], tuple[float, ...] | None, Any]:
    """(method, argv, own learning rates, validated config) of one entry, or a ConfigError naming the entry."""
    name, *pairs = text.split(":")
    name = name.strip()
    if name not in catalog.method_names():
        raise ConfigError(f"--methods: {name!r} is not a registered method; choose from "
                          f"{', '.join(catalog.method_names())}")
    argv, lrs = _to_argv(pairs, text)
    parser = method_parser(name)
    try:
        ns, unknown = parser.parse_known_args(argv)
        if unknown:
            bad = [u for u in unknown if u.startswith("--")] or unknown
            raise ConfigError(f"{name} has no flag {bad[0]}; its flags are {', '.join(_flags(parser))} (and lr=...)")
        config = config_from_args(catalog.get_method(name).config, ns)
        if hasattr(config, "validate"):
            config.validate()
    except ConfigError as e:
        raise ConfigError(f"--methods entry {text!r}: {e}") from None
    return name, argv, lrs, config


def parse_entry(text: str) -> Entry:
    """One entry, checked: the method is registered, every flag is the method's, the config validates."""
    name, argv, lrs, _ = _parsed(text)
    return Entry(text=text, method=name, argv=tuple(argv), lrs=lrs)


def entry_config(text: str) -> Any:
    """The method config an entry's flags give (e.g. to read its rank)."""
    return _parsed(text)[3]


def parse_methods(text: str) -> list[Entry]:
    """All entries of `--methods`, each checked (`parse_entry`); the same entry twice is refused."""
    entries = [parse_entry(e) for e in split_entries(text)]
    slugs = [e.slug for e in entries]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"--methods lists {dup} more than once; each entry trains once per seed")
    return entries


@dataclasses.dataclass(frozen=True)
class Budget:
    """The training length of every final run (exactly one of steps/epochs) and the share selection runs get."""

    steps: int | None
    epochs: float | None
    select_fraction: float = 0.5

    def validate(self) -> Budget:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give the budget of every run: --steps N or --epochs E (one of them)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: the budget must be at least 1 step")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--epochs {self.epochs}: the budget must be > 0 epochs")
        if not 0 < self.select_fraction <= 1:
            raise ConfigError(f"--select-fraction {self.select_fraction}: must be in (0, 1]")
        return self

    def argv(self, selection: bool) -> list[str]:
        """`--steps N` / `--epochs E` of a final run, or of a selection run (`select_fraction` of it)."""
        f = self.select_fraction if selection else 1.0
        if self.steps is not None:
            return ["--steps", str(max(1, math.ceil(self.steps * f)))]
        return ["--epochs", repr(self.epochs * f)]


@dataclasses.dataclass(frozen=True)
class Run:
    """One `jpeft train` process of the comparison."""

    entry: Entry
    kind: str  # "select" or "final"
    lr: float | None  # None for a final run until the entry's rate is chosen
    seed: int
    folder: str  # relative to the comparison's --out

    def describe(self) -> str:
        what = f"lr {self.lr:g}" if self.kind == "select" else f"seed {self.seed}"
        return f"{self.entry.label} [{self.kind} {what}]"


def selection_runs(entry: Entry, grid: tuple[float, ...], seed: int) -> list[Run]:
    """The entry's learning-rate trials (none when it has one rate)."""
    lrs = entry.lrs or grid
    if len(lrs) == 1:
        return []
    return [Run(entry, "select", lr, seed, f"select/{entry.slug}/lr_{lr:g}") for lr in lrs]


def final_runs(entry: Entry, seeds: tuple[int, ...]) -> list[Run]:
    return [Run(entry, "final", None, s, f"runs/{entry.slug}/seed_{s}") for s in seeds]


def default_grid(entry: Entry) -> tuple[float, ...]:
    """The method's own small grid (`MethodSpec.lr_grid`)."""
    return tuple(catalog.get_method(entry.method).lr_grid)


def plan_record(entries: list[Entry], grid: tuple[float, ...] | None, budget: Budget, seeds: tuple[int, ...],
                shared: list[str], data: dict[str, Any]) -> dict:
    """What a comparison promises to run, in JSON form: a rerun into the same --out must promise the same."""
    return {"methods": [e.text for e in entries], "lr_grids": {e.text: list(e.lrs or grid or default_grid(e))
                                                               for e in entries},
            "budget": dataclasses.asdict(budget), "seeds": list(seeds), "run_settings": shared, "data": data}
