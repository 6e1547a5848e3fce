"""Every training stage of RLCD, one sub-command each, and the whole pipeline.

    python train.py pipeline --task harmless --budget quick --out runs/pipeline-harmless
    python train.py ablate --task harmless --budget cpu --out runs/ablate-harmless
    python train.py simulate --task harmless --method rlcd --n-prompts 256 --out runs/harmless/pairs-rlcd.jsonl
    python train.py stats --files runs/harmless/pairs-rlcd.jsonl
    python train.py pm  --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/pm-rlcd
    python train.py sft --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/sft
    python train.py ppo --pm runs/harmless/pm-rlcd --prompts harmless --out runs/harmless/ppo
    python train.py dpo --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/dpo

`python train.py STAGE --help` lists a stage's settings. Each stage lives in its own module under
rlcd/ with a flat `Args` dataclass and a `main(argv)`; this file only dispatches.
"""
from __future__ import annotations

import importlib
import sys

from models import CheckpointError
from rlcd import distributed

STAGES = {
    "pipeline": ("rlcd.pipeline", "every stage below plus evaluation and a report, resumable (the main job)"),
    "ablate": ("rlcd.ablate", "the pipeline, then the RLCD policy remade once per variant (labels, designs), one report"),
    "simulate": ("rlcd.simulate", "simulate preference pairs (rlcd, rlaif, rlcd-rescore, rlcd-logprob)"),
    "stats": ("rlcd.simulate", "summarise a pairs file"),
    "pm": ("rlcd.pm", "train a Bradley-Terry preference model on pairs"),
    "sft": ("rlcd.sft", "supervised fine-tuning (the context-distillation baseline)"),
    "ppo": ("rlcd.ppo", "align a policy against a preference model with PPO"),
    "dpo": ("rlcd.dpo", "align a policy on the pairs directly with DPO (no preference model)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(__doc__.strip() + "\n\nstages:\n" +
              "\n".join(f"  {k:<9} {v[1]}" for k, v in STAGES.items()), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    stage, rest = argv[0], argv[1:]
    module = importlib.import_module(STAGES[stage][0])
    entry = getattr(module, "stats_main" if stage == "stats" else "main")
    try:
        return entry(rest) or 0
    except CheckpointError as e:        # a checkpoint a stage reads past its own checks: one line, not a traceback
        print(f"{distributed.tag('train.py ' + stage)}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    distributed.exit(main())        # sys.exit, or under torchrun a clean exit of every rank
