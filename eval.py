"""Evaluation commands.

    python eval.py pm-agreement --pm runs/harmless/pm-rlcd --pairs FILE.jsonl

`python eval.py COMMAND --help` lists a command's settings.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pm-agreement": ("rlcd.pm", "agreement_main",
                     "accuracy and mean chosen-probability of a preference model on a pairs file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands:\n" +
              "\n".join(f"  {k:<13} {v[2]}" for k, v in COMMANDS.items()), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, fn, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
