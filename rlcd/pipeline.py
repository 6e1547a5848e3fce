"""The main job: RLCD end to end for one task, in one run directory (train.py pipeline).

    python train.py pipeline --task harmless --budget quick --out runs/pipeline-harmless
    python train.py pipeline --task harmless --budget cpu --out runs/cpu-harmless
    python train.py pipeline --simulator qwen2.5-coder-0.5b-instruct ...   # the paper's larger-simulator row

Each stage is one of the project's own commands, run in this process with the budget's settings; the
exact command lines are written to OUT/commands.sh, so any stage can be rerun or changed by hand:

     stage            command                                         output
  1. pairs-rlcd       train.py simulate --method rlcd                 OUT/pairs-rlcd.jsonl
  2. pairs-rlaif      train.py simulate --method rlaif (judge labels)  OUT/pairs-rlaif.jsonl
  3. pm-rlcd          train.py pm on 1                                OUT/pm-rlcd/
  4. pm-rlaif         train.py pm on 2                                OUT/pm-rlaif/
  5. sft              train.py sft on 1's o+ (context distillation)   OUT/sft/
  6. dpo              train.py dpo on 1 (no preference model)         OUT/dpo/
  7. ppo-rlcd         train.py ppo against 3                          OUT/ppo-rlcd/
  8. ppo-rlaif        train.py ppo against 4                          OUT/ppo-rlaif/
  9. agreement        eval.py pm-agreement of 3 and 4 on human pairs  OUT/agreement-{rlcd,rlaif}.json
 10. respond          eval.py respond: base, rlcd, rlaif, cd, dpo     OUT/responses/<policy>.jsonl
                      harmless: also the helpful task's test prompts  OUT/responses-benign/<policy>.jsonl
 11. compare          eval.py compare with the judge (harmless:       OUT/compare.json
                      refusal rates on the benign prompts too)
 12. report           the tables below, curves as SVG                 OUT/report.md

Resuming. A stage that finished writes OUT/stages/<stage>.json (its time and result); a rerun skips it.
A stage that was interrupted is run again and resumes from its own partial output: simulate and respond
complete their JSONL files chunk by chunk, pm/sft/dpo/ppo continue from their last checkpoint (--resume,
restored bit for bit), the evaluation stages recompute. So the same command after a kill at any moment
finishes the job with nothing repeated that was complete and nothing lost.

Budgets (--budget): `quick` is what `make run` runs, a smoke run of every stage (minutes on 2 cores once the
models are converted: README.md has the measured figure); `cpu` is a run of about an hour and a half on such
a machine, harmlessness pairs from Qwen2.5-Coder-1.5B (CPU_PAIRS); `paper` is the paper's settings
(arXiv 2307.12950, Appendix) for a GPU.

Roles. The policy is aligned and, unless --pm-model names another model, is the preference models' trunk
(another family's PM scores PPO's rollouts from text). The simulator writes the pairs: the
policy, except under `cpu` for a task in CPU_PAIRS, which also names that task's prompt design
(otherwise paper-header); --simulator and --design override both. The judge (--judge) labels the RLAIF
pairs and compares the final policies; without --judge that is the task's chosen judge (rlcd.judge), and
RLAIF's labels come from the simulator whenever it is not the policy, as the paper's RLAIF is labelled
by the model that simulates (a bare model name: the task's judge configuration asked of that model).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models import CheckpointError
from rlcd import dpo, evaluate, pm, ppo, respond, sft, simulate
from rlcd.checkpoints import CKPT_DIRS, RUN_JSON
from rlcd.cli import ArgsError, argv_of, parse_args, read_args
from rlcd.designs import load_designs
from rlcd.jsonl import write_json_atomic
from rlcd.tasks import TASKS

DEFAULT_POLICY = "smollm2-135m-instruct"
DEFAULT_DESIGN = "paper-header"
# The trained policies and their run directories in OUT; "base" is the policy itself.
POLICY_RUNS = {"rlcd": "ppo-rlcd", "rlaif": "ppo-rlaif", "cd": "sft", "dpo": "dpo"}   # cd = context distillation
POLICIES = ("base", *POLICY_RUNS)
# The over-refusal check: a task whose policies also answer another task's benign test prompts, where a
# refusal is a failure (eval.py compare --benign).
BENIGN = {"harmless": "helpful"}

# The cpu budget's simulator and prompt design per task (and, where it is not the policy, the preference
# models' trunk), as the measurement of designs x simulators chose them (docs/SIMULATE.md); used unless
# --simulator / --design / --pm-model are given. Other tasks and budgets: the policy simulates, with
# DEFAULT_DESIGN, and is the trunk. On the same 512 harmless pairs a PM on the policy's 135M trunk agrees
# with 0.731 of the human pairs and one on Qwen2.5-Coder-0.5B with 0.744 (docs/RESULTS.md): no reason yet
# to pay for the larger trunk.
# Instructions: on 50 dev prompts, o+ of Qwen2.5-Coder-1.5B under the paper-style header affixes meets every
# checkable constraint in 0.33 of pairs and o- in 0.18 (paired difference 0.14 [0.02, 0.27]); the system
# carrier, the follow-vs-ignore design and the 135M model give no difference (docs/SIMULATE.md).
# Helpful: of 3 simulators x 6 designs on 64 dev prompts, the one cell the task's judge (unvalidated here) prefers
# o+ in most, 0.66 [0.61, 0.70]: the paper's own affixes on Qwen2.5-Coder-0.5B, whose o- decline in 0.75 of pairs
# (the 1.5B model's 0.63 [0.59, 0.68] is self-judged; the designs written for the task stay at 0.49-0.51).
# Outlines: no cell above 0.54; the highest, 0.54 [0.52, 0.56] (self-judged), the paper's affixes as a system
# instruction on Qwen2.5-Coder-1.5B, whose o- decline in 0.22 of pairs.
CPU_PAIRS = {"harmless": dict(simulator="qwen2.5-coder-1.5b-instruct", design="explain-vs-prefill"),
             "helpful": dict(simulator="qwen2.5-coder-0.5b-instruct", design="paper-header"),
             "outlines": dict(simulator="qwen2.5-coder-1.5b-instruct", design="paper-system"),
             "instructions": dict(simulator="qwen2.5-coder-1.5b-instruct", design="paper-header")}

# Settings per budget. Each stage's flags; anything not listed is that command's default.
BUDGETS: dict[str, dict[str, dict]] = {
    # Minutes on 2 idle cores: a smoke run of the whole method, too small to align anything.
    "quick": {
        "simulate": dict(n_prompts=32, max_new_tokens=48, batch_size=16),
        "pm": dict(train_layers=4, epochs=2, batch_size=8, micro_batch=8, lr=5e-5, dev=4, eval_every=0,
                   norm_samples=16, norm_max_new_tokens=48, save_every=0),
        "sft": dict(train_layers=4, epochs=1, batch_size=8, micro_batch=8, lr=2e-5, dev=4, eval_every=0,
                    save_every=0),
        # lr 1e-5 for the top 4 blocks: not tuned (the paper's 1e-6 is for a full fine-tune).
        "dpo": dict(train_layers=4, epochs=1, batch_size=8, micro_batch=8, lr=1e-5, beta=0.1, dev=4, eval_every=0,
                    save_every=0),
        # One optimiser step per iteration (1 epoch x 1 minibatch), the value network at the policy's rate.
        "ppo": dict(iterations=4, batch_size=8, ppo_epochs=1, minibatches=1, micro_batch=8, value_lr="none",
                    max_new_tokens=48, lr=1e-5, kl_coef=0.02, train_layers=4, no_stop_score="none", save_every=2,
                    sample_every=0),
        "respond": dict(n_prompts=16, max_new_tokens=48, batch_size=16),
        "agreement": dict(batch_size=8),
        "compare": dict(batch_size=8),
    },
    # About an hour and a half on 2 cores (Intel Xeon with AMX, bf16: 100 min as set here, on a slow spell
    # of the machine; 85 with PPO on the top 8 blocks; docs/RESULTS.md), close to the measured
    # stage-by-stage runs (docs/PM.md, docs/PPO.md).
    "cpu": {
        # 384 prompts: Qwen2.5-Coder-1.5B simulates about 27 pairs a minute on 2 cores in bf16 (Intel Xeon
        # with AMX), so the RLCD and RLAIF pairs take about half an hour between them.
        "simulate": dict(n_prompts=384, max_new_tokens=64, batch_size=32),
        "pm": dict(train_layers=4, epochs=2, batch_size=16, micro_batch=8, lr=5e-5, dev=64, eval_every=0,
                   norm_samples=64, norm_max_new_tokens=64, save_every=20),
        # SFT and DPO on the top 4 blocks, as the preference models train (full fine-tunes of 3 epochs took 25
        # of the budget's minutes); DPO's lr is for those blocks (the paper's 1e-6 is a full fine-tune's).
        "sft": dict(train_layers=4, epochs=2, batch_size=32, micro_batch=8, lr=5e-5, dev=64, eval_every=0,
                    save_every=20),
        "dpo": dict(train_layers=4, epochs=2, batch_size=32, micro_batch=8, lr=1e-5, beta=0.1, dev=64, eval_every=0,
                    save_every=20),
        # PPO's own defaults (2 epochs x 2 minibatches, the value network at 10x the policy's rate; rlcd/ppo.py
        # PRESETS says what was measured), a full fine-tune, over 32 iterations of 16 rollouts (~31 s each). On
        # the top 8 blocks an iteration takes ~22 s, but over 40 of them the PM's score and the KL stayed
        # within noise of their start (0.2 standard deviations, 0.3 nat; docs/RESULTS.md).
        "ppo": dict(iterations=32, batch_size=16, max_new_tokens=64, lr=1e-5, kl_coef=0.02, no_stop_score="none",
                    save_every=8, sample_every=8),
        "respond": dict(n_prompts=None, max_new_tokens=64, batch_size=32),
        "agreement": dict(batch_size=16),
        "compare": dict(batch_size=16),
    },
    # The paper's settings (arXiv 2307.12950, Appendix: temperature 1, 300 tokens, full fine-tunes, 512
    # rollouts) on a GPU.
    "paper": {
        "simulate": dict(n_prompts=None, max_new_tokens=300, temperature=1.0, top_p=1.0, batch_size=64,
                         device="cuda"),
        "pm": dict(epochs=1, batch_size=16, micro_batch=8, lr=3e-6, dev=500, eval_every=50, norm_samples=256,
                   norm_max_new_tokens=300, save_every=100, device="cuda"),
        "sft": dict(epochs=3, batch_size=128, micro_batch=16, lr=2e-5, dev=0.05, save_every=100, device="cuda"),
        # DPO's settings (Rafailov et al. 2023): a full fine-tune, lr 1e-6, beta 0.1, 64 pairs a step.
        "dpo": dict(epochs=1, batch_size=64, micro_batch=8, lr=1e-6, beta=0.1, dev=0.05, save_every=100,
                    device="cuda"),
        "ppo": dict(preset="paper", device="cuda", save_every=5),
        "respond": dict(n_prompts=None, max_new_tokens=300, temperature=1.0, top_p=1.0, batch_size=64,
                        device="cuda"),
        "agreement": dict(batch_size=32, device="cuda"),
        "compare": dict(batch_size=16, device="cuda"),
    },
}


@dataclass
class Args:
    """RLCD end to end for one task: pairs, preference models, SFT, DPO, PPO, evaluation, report (train.py pipeline)."""
    out: str                                  # run directory; rerun the same command to resume it
    task: str = "harmless"                    # harmless, helpful, outlines or instructions (rlcd.tasks.TASKS)
    budget: str = "quick"                     # quick (minutes on 2 CPU cores), cpu (hours), paper (GPU)
    policy: str = DEFAULT_POLICY              # the model aligned (and, by default, the trunk of the preference models)
    pm_model: str | None = None               # the preference models' trunk (default: the policy; --budget cpu: CPU_PAIRS's for the task); another family's PM scores PPO's rollouts from text
    simulator: str | None = None              # the model that simulates pairs (default: the policy; --budget cpu: CPU_PAIRS's for the task)
    design: str | None = None                 # how RLCD's p+ and p- are made (rlcd.designs: a name or JSON file; default: paper-header; --budget cpu: CPU_PAIRS's)
    judge: str | None = None                  # rlcd.judge spec of RLAIF's labels and the final comparison (default: the task's; RLAIF: a simulator other than the policy)
    prompts: str | None = None                # a prompts file instead of the task's built-in set
    human_pairs: str = "human"                # labelled pairs for pm-agreement ("human": PyRIT's allowed half)
    seed: int = 0                             # every stage's seed
    set: list[str] | None = None              # override a budget setting: STAGE.FLAG=VALUE ... (e.g. ppo.iterations=8)
    progress: bool = True                     # each stage's progress bar


STAGES = ("pairs-rlcd", "pairs-rlaif", "pm-rlcd", "pm-rlaif", "sft", "dpo", "ppo-rlcd", "ppo-rlaif", "agreement",
          "respond", "compare", "report")

# The commands the stages run, (script, command) as the stage's command line names it -> the entry point
# that script dispatches to and the Args it parses. The pipeline calls the entry points itself.
COMMANDS = {
    ("train.py", "simulate"): (simulate.main, simulate.Args),
    ("train.py", "pm"): (pm.main, pm.Args),
    ("train.py", "sft"): (sft.main, sft.Args),
    ("train.py", "dpo"): (dpo.main, dpo.Args),
    ("train.py", "ppo"): (ppo.main, ppo.Args),
    ("eval.py", "pm-agreement"): (pm.pm_agreement_main, pm.PMAgreementArgs),
    ("eval.py", "respond"): (respond.main, respond.Args),
    ("eval.py", "compare"): (evaluate.compare_main, evaluate.CompareArgs),
}


def budget_settings(budget: str, overrides: list[str] | None) -> dict[str, dict]:
    """The budget's per-stage settings with --set STAGE.FLAG=VALUE overrides (VALUE read as JSON when it
    parses, e.g. 8, 0.5, null, true; else as a string)."""
    b = {stage: dict(v) for stage, v in BUDGETS[budget].items()}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not (sep and dot and flag) or stage not in b:
            raise ValueError(f"--set {item!r}: expected STAGE.FLAG=VALUE with STAGE one of {sorted(b)}")
        try:
            b[stage][flag.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            b[stage][flag.replace("-", "_")] = value
    return b


def resolve_roles(args: Args) -> Args:
    """`args` with the simulator, the design and the PM trunk filled in: the user's flags, else the budget's
    choice for the task (CPU_PAIRS under `cpu`), else the policy, DEFAULT_DESIGN and the policy."""
    chosen = CPU_PAIRS.get(args.task, {}) if args.budget == "cpu" else {}
    return dataclasses.replace(args, simulator=args.simulator or chosen.get("simulator", args.policy),
                               design=args.design or chosen.get("design", DEFAULT_DESIGN),
                               pm_model=args.pm_model or chosen.get("pm_model", args.policy))


def judges(args: Args) -> tuple[str, str]:
    """(the judge of the RLAIF labels, the judge of the final comparison), as rlcd.judge specs: --judge for
    both when given; else the task's chosen judge, except that a simulator other than the policy labels
    its own RLAIF pairs (a bare model: the task's judge configuration asked of it), as in the paper."""
    if args.judge is not None:
        return args.judge, args.judge
    sim = resolve_roles(args).simulator
    return (sim if sim != args.policy else "default"), "default"


def plan(args: Args) -> dict[str, list[list[str]]]:
    """The command lines (argv after `train.py` / `eval.py`) of every stage, in order."""
    if args.budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {sorted(BUDGETS)}, got {args.budget!r}")
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    args = resolve_roles(args)
    load_designs(args.design)                    # a bad design (or part of a mixture) before any stage runs
    rlaif_judge, judge = judges(args)
    b, out = budget_settings(args.budget, args.set), Path(args.out)
    common = dict(seed=args.seed, progress=args.progress)
    prompts = args.prompts or args.task
    sim = dict(task=args.task, prompts=args.prompts, model=args.simulator, **b["simulate"], **common)
    train = dict(model=args.policy, **common)
    # The preference models: on the policy's trunk, or on another model's, normalised on the policy's samples.
    pm_flags = dict(common, model=args.pm_model, **b["pm"],
                    **({"norm_policy": args.policy} if args.pm_model != args.policy else {}))
    policies = [f"base={args.policy}", *(f"{p}={out / d}" for p, d in POLICY_RUNS.items())]

    def respond_cmd(out_dir: Path, task: str, prompts_file: str | None) -> list[str]:
        return ["eval.py", "respond", *argv_of(dict(policy=policies, out_dir=out_dir, task=task, prompts=prompts_file,
                                                    split="test", **b["respond"], **common))]
    benign = BENIGN.get(args.task)
    ppo_flags = dict(policy=args.policy, prompts=prompts, **b["ppo"], seed=args.seed)  # ppo prints each iteration
    cmds: dict[str, list[list[str]]] = {
        "pairs-rlcd": [["train.py", "simulate", *argv_of(dict(out=out / "pairs-rlcd.jsonl", method="rlcd",
                                                               design=args.design, **sim))]],
        "pairs-rlaif": [["train.py", "simulate", *argv_of(dict(out=out / "pairs-rlaif.jsonl", method="rlaif",
                                                                judge=rlaif_judge, **sim))]],
        "pm-rlcd": [["train.py", "pm", *argv_of(dict(out=out / "pm-rlcd", pairs=[out / "pairs-rlcd.jsonl"],
                                                     **pm_flags))]],
        "pm-rlaif": [["train.py", "pm", *argv_of(dict(out=out / "pm-rlaif", pairs=[out / "pairs-rlaif.jsonl"],
                                                      **pm_flags))]],
        "sft": [["train.py", "sft", *argv_of(dict(out=out / "sft", pairs=[out / "pairs-rlcd.jsonl"], field="chosen",
                                                  **train, **b["sft"]))]],
        "dpo": [["train.py", "dpo", *argv_of(dict(out=out / "dpo", pairs=[out / "pairs-rlcd.jsonl"], **train,
                                                  **b["dpo"]))]],
        "ppo-rlcd": [["train.py", "ppo", *argv_of(dict(out=out / "ppo-rlcd", pm=out / "pm-rlcd", **ppo_flags))]],
        "ppo-rlaif": [["train.py", "ppo", *argv_of(dict(out=out / "ppo-rlaif", pm=out / "pm-rlaif", **ppo_flags))]],
        # The human pairs are stored as plain dialogue; the PMs were trained on pairs in the simulator's
        # format (chat unless --set simulate.format=plain), so their prompts are re-rendered in it.
        "agreement": [["eval.py", "pm-agreement", *argv_of(dict(pm=out / f"pm-{m}", pairs=[args.human_pairs],
                                                                format=b["simulate"].get("format", "chat"),
                                                                out=out / f"agreement-{m}.json", **b["agreement"]))]
                      for m in ("rlcd", "rlaif")],
        # The over-refusal check's prompts are the benign task's own test split, whatever --prompts says.
        "respond": [respond_cmd(out / "responses", args.task, args.prompts)]
                   + ([respond_cmd(out / "responses-benign", benign, None)] if benign else []),
        "compare": [["eval.py", "compare", *argv_of(dict(
            responses=[out / "responses" / f"{p}.jsonl" for p in POLICIES], judge=judge, baseline="base",
            focus="rlcd", pm=out / "pm-rlcd", out=out / "compare.json", seed=args.seed, **b["compare"],
            benign=[out / "responses-benign" / f"{p}.jsonl" for p in POLICIES] if benign else None))]],
    }
    return cmds


def _run_command(argv: list[str]) -> int:
    """Run one of the project's commands in this process, ["train.py", stage, ...] or ["eval.py", cmd, ...],
    through its entry point (COMMANDS), as that script would: a checkpoint that fails to load past the
    command's own checks is one line on stderr and exit code 2."""
    script, command, rest = argv[0], argv[1], argv[2:]
    entry, _ = COMMANDS[script, command]
    try:
        return entry(rest) or 0
    except CheckpointError as e:
        print(f"{script} {command}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                   # argparse and the stages' own checks exit
        return e.code if isinstance(e.code, int) else 2


def _resumable(argv: list[str]) -> list[str]:
    """A training stage whose run directory holds a checkpoint is continued with --resume."""
    if argv[0] != "train.py" or argv[1] not in CKPT_DIRS:
        return argv
    out = Path(argv[argv.index("--out") + 1])
    ckpt = out / CKPT_DIRS[argv[1]] / RUN_JSON
    return argv + ["--resume"] if ckpt.is_file() else argv


def check_plan(cmds: dict[str, list[list[str]]]) -> None:
    """Parse every stage's command line as the stage will (rlcd.cli.read_args), before any stage runs: a
    bad --set value or flag is a ValueError naming the stage now, not after the stages before it."""
    for stage, argvs in cmds.items():
        for argv in argvs:
            script, command, rest = argv[0], argv[1], [str(a) for a in argv[2:]]
            _, cls = COMMANDS[script, command]
            rest = ppo.apply_preset(rest) if cls is ppo.Args else rest        # as ppo.main parses it
            try:
                read_args(cls, rest, prog=f"{script} {command}")
            except ArgsError as e:
                raise ValueError(f"stage {stage} ({script} {command}): {e}") from None


# Settings that name files or directories: on resume, the same file spelled another way is the same setting.
PATH_SETTINGS = ("policy", "simulator", "pm_model", "prompts", "human_pairs")


def _same_path(a, b) -> bool:
    """Whether two settings name the same existing file or directory (runs/x, ./runs/x, /abs/runs/x)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def resume_settings(args: Args, saved: dict) -> Args:
    """`args` for resuming the pipeline whose settings pipeline.json holds (`saved`), or a ValueError
    naming every setting that differs. The directory itself is the run: --out is not compared, so the
    run resumes under any spelling of its path and after the directory moved. A file setting spelled
    differently but naming the same file is the same setting; the saved spelling is kept (so the stages'
    command lines, which their own resumes compare, are those of the first invocation), as is the saved
    --out when it still names this directory."""
    now = {k: v for k, v in asdict(args).items() if k != "progress"}
    keep = {k: saved[k] for k in PATH_SETTINGS if k in saved and saved[k] != now[k] and _same_path(saved[k], now[k])}
    if _same_path(saved.get("out"), args.out):
        keep["out"] = saved["out"]
    changed = sorted(k for k in now if k != "out" and k not in keep and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"{args.out}: a pipeline with other settings is there "
                         f"({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in changed)}); its path does "
                         f"not matter, these settings do: rerun with the saved ones (pipeline.json) or choose "
                         f"another --out")
    return dataclasses.replace(args, **keep)


def _log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: Args) -> Path:
    """Run (or resume) every stage; returns the report's path."""
    args = resolve_roles(args)              # pipeline.json records the simulator and design the run uses
    config = Path(args.out) / "pipeline.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text())
        except ValueError as e:
            raise ValueError(f"{config}: invalid JSON ({e})") from None
        args = resume_settings(args, saved)
    out = Path(args.out)
    cmds = plan(args)
    check_plan(cmds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    if not config.is_file():
        write_json_atomic(config, {k: v for k, v in asdict(args).items() if k != "progress"})
    write_commands(out / "commands.sh", cmds, "train.py pipeline")

    def report() -> None:
        from rlcd.report import write_report
        write_report(out, args, list(STAGES), list(POLICIES), judges(args))

    run_stages(out, STAGES, cmds, {"report": report})
    _log(f"report: {out / 'report.md'}")
    return out / "report.md"


def write_commands(path: Path, cmds: dict[str, list[list[str]]], who: str) -> None:
    """The stages' command lines as a bash script, in order, one comment line per stage."""
    lines = ["#!/usr/bin/env bash", f"# The commands {who} runs, in order (each resumes when rerun).",
             "set -euo pipefail"]
    for stage, argvs in cmds.items():
        lines += [f"# {stage}"] + [".venv/bin/python " + shlex.join(map(str, a)) for a in argvs]
    path.write_text("\n".join(lines) + "\n")


def run_stages(out: Path, stages, cmds: dict[str, list[list[str]]], calls: dict | None = None) -> None:
    """Run `stages` in order, each either its command lines in `cmds` or a function in `calls`, skipping a
    stage whose marker OUT/stages/<stage>.json says it finished and writing that marker (its time) when it
    does: the resumable run loop of train.py pipeline and train.py ablate."""
    (out / "stages").mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for stage in stages:
        marker = out / "stages" / f"{stage}.json"
        if marker.is_file():
            _log(f"{stage}: done before ({json.loads(marker.read_text())['seconds']:.0f} s), skipped")
            continue
        _log(f"{stage}: start")
        t0 = time.perf_counter()
        if calls and stage in calls:
            calls[stage]()
        else:
            for argv in cmds[stage]:
                rc = _run_command(_resumable(argv))
                if rc != 0:
                    raise RuntimeError(f"stage {stage} failed (exit {rc}): {shlex.join(argv)}")
        seconds = time.perf_counter() - t0
        write_json_atomic(marker, {"stage": stage, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        _log(f"{stage}: done in {seconds:.0f} s")
    _log(f"all stages done ({time.perf_counter() - t_all:.0f} s in this invocation)")


def entry(argv: list[str] | None, cls, run_fn, prog: str) -> int:
    """The command line of a job that runs stages in this process (train.py pipeline, train.py ablate): parse,
    refuse torchrun, run, print the report's path; a bad setting or a failed stage is one line and exit 2."""
    args = parse_args(cls, argv, prog=prog, description=cls.__doc__)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would run every stage, the judge and the report on its own: refuse instead.
        print(f"{prog}: not under torchrun (it runs the stages and the evaluation in one process); "
              "run its stages one by one under torchrun (train.py simulate, pm, sft, ppo; eval.py respond), "
              "see docs/SCALING.md", file=sys.stderr)
        return 2
    try:
        report = run_fn(args)
    except (ValueError, RuntimeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry(argv, Args, run, "train.py pipeline")
