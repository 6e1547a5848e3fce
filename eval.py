"""Evaluation commands.

    python eval.py respond --policy base=smollm2-135m-instruct rlcd=runs/harmless/ppo --out-dir runs/harmless/responses
    python eval.py compare --responses runs/harmless/responses/*.jsonl --out compare.json   # judge: Qwen2.5-Coder-1.5B
    python eval.py judge-agreement --judge smollm2-135m-instruct --pairs human           # how good a judge is
    python eval.py pm-agreement --pm runs/harmless/pm-rlcd --pairs human --format chat
    python eval.py contrast --simulator qwen2.5-coder-1.5b-instruct --design paper-header refuse-vs-prefill --out runs/contrast

`python eval.py COMMAND --help` lists a command's settings.
"""
from __future__ import annotations

import importlib
import sys

from models import CheckpointError
from rlcd import distributed

COMMANDS = {
    "respond": ("rlcd.respond", "main",
                "responses of each policy to the same held-out prompts (one resumable JSONL per policy)"),
    "compare": ("rlcd.evaluate", "compare_main",
                "pairwise win rates of policies by a judge model, with judge-free statistics"),
    "judge-agreement": ("rlcd.evaluate", "judge_agreement_main",
                        "accuracy, position and length bias of a pairwise judge on labelled pairs"),
    "contrast": ("rlcd.contrast", "main",
                 "how differentiated a simulator's RLCD pairs are under each prompt design (dev prompts)"),
    "pm-agreement": ("rlcd.pm", "pm_agreement_main",
                     "accuracy and mean chosen-probability of a preference model on a pairs file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands:\n" +
              "\n".join(f"  {k:<16} {v[2]}" for k, v in COMMANDS.items()), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, fn, _ = COMMANDS[argv[0]]
    try:
        return getattr(importlib.import_module(module), fn)(argv[1:]) or 0
    except CheckpointError as e:        # a checkpoint read past a command's own checks: one line, not a traceback
        print(f"{distributed.tag('eval.py ' + argv[0])}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    distributed.exit(main())        # sys.exit, or under torchrun a clean exit of every rank
