"""Command lines from flat `Args` dataclasses.

Every script and training stage declares one dataclass; each field's trailing `# comment` is its
`--help` text. Unknown flags are rejected by argparse. `save_config` writes the resolved values next to
a run's outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path


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


def parse_args(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """Parse `argv` into an instance of dataclass `cls`; `--field-name value` for every field."""
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
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
    ns = p.parse_args(argv)
    return cls(**vars(ns))


def save_config(args, path: str | Path) -> None:
    """Write the resolved Args as JSON (atomically: a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
    tmp.replace(path)
