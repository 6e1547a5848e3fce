"""Command lines from flat `Args` dataclasses.

Every script and training stage declares one dataclass; each field's trailing `# comment` is its
`--help` text. Unknown flags are rejected by argparse. Every numeric value is checked against the rule of
its field name (RULES) when the command line is parsed, before a command loads a model or touches a file,
so a bad value is one line naming the flag and exit code 2, never a traceback minutes later.
`argv_of` writes settings back as flags (ppo's presets, the pipeline's budgets); `save_config` writes the
resolved values next to a run's outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import typing
from pathlib import Path

from rlcd.jsonl import write_json_atomic


class ArgsError(ValueError):
    """A command line that cannot run: an unknown or missing flag, a value that does not parse, is out of
    its field's range or (a dataclass's __post_init__) does not fit the others. One line naming the flag."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag may take: lo <= v (lo < v if lo_open) and v <= hi (v < hi if hi_open),
    always finite. `note` says what a boundary value means (e.g. 0 = greedy)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        return (math.isfinite(v)
                and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            s = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            s = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            s = "a finite number"
        return s + (f" ({self.note})" if self.note else "")


COUNT = Range(1)                    # a size or a number of things: at least one
OFF_AT_0 = Range(0, note="0 = off") # a count or interval where 0 switches the thing off
POSITIVE = Range(0, lo_open=True)
NONNEGATIVE = Range(0)
UNIT = Range(0, 1)
ANY = Range()                       # any finite number

# One rule per field name, for every command (a field of the same name means the same thing everywhere).
# Fields typed `X | None` may also be none; strings are checked by their commands (choices, files).
RULES: dict[str, Range] = {
    # sizes and counts
    **dict.fromkeys(["batch_size", "micro_batch", "eval_batch_size", "minibatches", "ppo_epochs", "iterations",
                     "max_new_tokens", "norm_max_new_tokens", "max_prompt_tokens", "max_length", "max_tries",
                     "n_prompts", "limit", "n_boot", "kl_horizon", "smooth",
                     # the benchmarks'
                     "batch", "batches", "iters", "repeats", "tokens", "new_tokens", "prompt_len", "layers",
                     "rows", "prompts"], COUNT),
    "folds": Range(2),                                          # cross-validation
    "epochs": POSITIVE,                                         # may be fractional
    # counts and intervals where 0 has a meaning of its own (each flag's help says which)
    "stop_after": Range(0, note="0 = run the whole schedule"),
    "max_steps": Range(0, note="0 = from --epochs"),
    "train_layers": Range(0, note="0 = full fine-tune"),
    "threads": Range(0, note="0 = leave as is"),
    "warmup": NONNEGATIVE, "dev": NONNEGATIVE, "seed": NONNEGATIVE, "examples": NONNEGATIVE,
    "principles": NONNEGATIVE, "questions": NONNEGATIVE,        # indices
    **dict.fromkeys(["save_every", "eval_every", "sample_every", "n_samples", "norm_samples", "top_k",
                     "balance_length"], OFF_AT_0),
    # optimiser
    "lr": POSITIVE, "value_lr": POSITIVE,
    "weight_decay": NONNEGATIVE,
    "min_lr_ratio": UNIT,
    "betas": Range(0, 1, hi_open=True),
    "grad_clip": Range(0, note="0 = off"),
    # sampling
    "temperature": Range(0, note="0 = greedy"),
    "norm_temperature": Range(0, note="0 = greedy"),
    "top_p": Range(0, 1, lo_open=True, note="1 = off"),
    # losses and PPO
    "clip": POSITIVE, "value_clip": POSITIVE,
    "kl_coef": NONNEGATIVE, "kl_target": POSITIVE, "vf_coef": NONNEGATIVE, "ent_coef": NONNEGATIVE,
    "center_coef": NONNEGATIVE, "length_head": Range(0, note="0 = off"), "gamma": UNIT, "lam": UNIT,
    "beta": POSITIVE, "label_smoothing": Range(0, 0.5, hi_open=True, note="0 = off"),     # DPO
    "margin": ANY, "no_stop_score": ANY,
    # evaluation
    "tie": Range(0, 0.5, hi_open=True),
}


def check_value(name: str, value) -> None:
    """ArgsError naming --NAME when a numeric `value` (or an element of a list) breaks RULES[name]."""
    rule = RULES.get(name)
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue                               # none, strings, flags: checked by the command itself
        if rule is None:
            if isinstance(v, float) and not math.isfinite(v):
                raise ArgsError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
            continue
        if v not in rule:
            raise ArgsError(f"--{name.replace('_', '-')} must be {rule}, got {v}")


def _field_docs(cls) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M):
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _parser_type(tp):
    """(argparse type, nargs) for a field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        inner, nargs = _parser_type(args[0])
        return (lambda s: None if s.lower() == "none" else inner(s)), nargs
    if origin is list:
        return args[0], "+"
    return tp, None


class _Parser(argparse.ArgumentParser):
    """argparse's parser, raising ArgsError instead of printing the usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ArgsError(message)


def read_args(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """`argv` as an instance of dataclass `cls` (`--field-name value` for every field), every value checked
    (RULES); ArgsError (one line) for a command line that cannot run. --help prints and exits."""
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    p = _Parser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = hints[f.name]
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs.get(f.name))
            continue
        typ, nargs = _parser_type(tp)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        p.add_argument(flag, type=typ, nargs=nargs, default=default, required=required,
                       help=docs.get(f.name), dest=f.name)
    values = vars(p.parse_args(argv))
    for name, value in values.items():
        check_value(name, value)
    try:
        return cls(**values)
    except ValueError as e:                         # a __post_init__ that rejects a combination of values
        raise ArgsError(str(e)) from None
    except SystemExit as e:                         # ... or exits with its message
        if not isinstance(e.code, str):
            raise
        raise ArgsError(e.code.removeprefix(f"{p.prog}: ")) from None


def parse_args(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """read_args for a command's main(): a command line that cannot run is one line on stderr,
    `PROG: --flag must be ..., got VALUE`, and exit code 2."""
    try:
        return read_args(cls, argv, prog, description)
    except ArgsError as e:
        print(f"{prog or Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def argv_of(settings: dict) -> list[str]:
    """Settings as a command line's flags: {"n_prompts": 32, "progress": False,
    "pairs": [a], "limit": None} -> ["--n-prompts", "32", "--no-progress", "--pairs", a] (None: not given, so
    the command's default). Flags given after these override them (argparse keeps an option's last value):
    how ppo's presets and the pipeline's budgets reach a command."""
    argv: list[str] = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is None:
            continue
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def save_config(args, path: str | Path) -> None:
    """Write the resolved Args as JSON, atomically (rlcd.jsonl.write_json_atomic)."""
    write_json_atomic(path, dataclasses.asdict(args))
