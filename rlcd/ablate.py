"""RLCD's ablations in one command (train.py ablate): the pipeline, then the RLCD policy remade with one thing
changed per variant, every variant judged against the same base and the same RLCD policy, one report.

    python train.py ablate --task harmless --budget cpu --out runs/ablate-harmless
    python train.py ablate --budget quick --variants logprob design=plain-vs-prefill --out runs/ablate-quick

Variants (--variants; default: DEFAULT_VARIANTS of the task):
    logprob        the pipeline's RLCD pairs relabelled with a soft label from the simulator's own
                   log-probabilities, how much more p+ explains o+ than o- (DLMA's score; train.py simulate
                   --method rlcd-logprob --from-pairs): binary vs continuous labels from the same prompts
    rescore        the same pairs relabelled by the judge of RLAIF's labels, P(o+ better) (the paper's
                   RLCD-Rescore; --method rlcd-rescore --from-pairs)
    design=NAME    pairs simulated anew under another prompt design (rlcd.designs): beside the pipeline's
                   own, designs at other p+/p- token overlaps answer how close p+ and p- should be

Layout and stages. The pipeline runs first, in OUT/pipeline/ (train.py pipeline with this command's
settings: base, rlcd, rlaif, cd, dpo), then one more comparison, base against rlaif, cd and dpo (the
pipeline judges rlcd against each), OUT/compare-base.json. Each variant V then runs in OUT/V/, with the
pipeline's command lines and settings changed only where the variant says:

    V.pairs       train.py simulate            OUT/V/pairs-rlcd.jsonl
    V.pm          train.py pm on them          OUT/V/pm-rlcd/
    V.ppo         train.py ppo against it      OUT/V/ppo-rlcd/
    V.agreement   eval.py pm-agreement         OUT/V/agreement.json        (the human pairs)
    V.respond     eval.py respond              OUT/V/responses{,-benign}/V.jsonl
    V.compare     eval.py compare --focus V    OUT/V/compare.json          (V vs base and vs rlcd, with the
                                                                           pipeline's judge and benign prompts)

A stage resumes as the pipeline's do (markers in OUT/stages/, every command line in OUT/commands.sh); a
variant added on a rerun runs its stages, the finished ones are skipped. The report, OUT/ablation.md and
OUT/ablation.json, has one row per policy: the pairs' contrast (judge-free: refusals of o+ and o-, lengths,
the p+/p- token overlap, the mean label; instruction following of o+ and o- for a task with verifiable
constraints), the PM's agreement with the human pairs (all, and both halves of the length split, with
intervals resampling requests), the judged win rate against base and against rlcd (95% bootstrap intervals,
length-controlled beside), the refusal rate on the harmful test prompts and on the benign ones (their
change from base), the mean response length.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rlcd import pipeline
from rlcd.cli import argv_of
from rlcd.jsonl import read_objects, write_atomic, write_json_atomic

# The variants run when --variants is not given. Harmless: both soft labels and, beside the cpu budget's
# explain-vs-prefill (p+/p- token overlap 0.39 on Qwen2.5-Coder-1.5B), refuse-vs-prefill (0.52) and
# plain-vs-prefill (0.91), the three designs that separate that simulator's sides (docs/SIMULATE.md).
DEFAULT_VARIANTS = {"harmless": ("logprob", "rescore", "design=refuse-vs-prefill", "design=plain-vs-prefill")}
LABEL_VARIANTS = {"logprob": "rlcd-logprob", "rescore": "rlcd-rescore"}


@dataclass
class Args(pipeline.Args):
    """The pipeline and the RLCD policy remade once per variant, one report (train.py ablate)."""
    variants: list[str] | None = None         # logprob, rescore, design=NAME ... (default: DEFAULT_VARIANTS of the task, else logprob rescore)


def variant_name(spec: str) -> str:
    """The directory and stage prefix of a variant: logprob, rescore, design-NAME (a JSON design: its stem)."""
    if spec in LABEL_VARIANTS:
        return spec
    kind, sep, value = spec.partition("=")
    if kind != "design" or not sep or not value:
        raise ValueError(f"--variants {spec!r}: expected logprob, rescore or design=NAME")
    return f"design-{Path(value).stem}"


def with_flags(argv: list[str], **flags) -> list[str]:
    """A command line with each flag's value replaced (the flag and the values after it removed, then the
    flag appended as rlcd.cli.argv_of writes it)."""
    out, skip = [], False
    names = {"--" + k.replace("_", "-") for k in flags}
    for a in argv:
        if a.startswith("--"):
            skip = a in names or (a.startswith("--no-") and "--" + a[5:] in names)
        if not skip:
            out.append(a)
    return out + argv_of(flags)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def plan(args: Args, main: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
    """Every ablation stage's command lines, made from the pipeline's (`main`, pipeline.plan of OUT/pipeline)."""
    out, p = Path(args.out), Path(args.out) / "pipeline"
    compare = main["compare"][0]
    benign = "--benign" in compare
    resp = lambda d, name: p / d / f"{name}.jsonl"                                       # noqa: E731
    cmds = {"compare-base": [with_flags(compare, responses=[resp("responses", x) for x in pipeline.POLICIES],
                                        focus="base", out=out / "compare-base.json",
                                        **({"benign": [resp("responses-benign", x) for x in pipeline.POLICIES]}
                                           if benign else {}))]}
    rlaif_judge = pipeline.judges(args)[0]
    for spec in variants_of(args):
        v = variant_name(spec)
        d = out / v
        pairs = main["pairs-rlcd"][0]
        if spec in LABEL_VARIANTS:
            pairs = with_flags(pairs, method=LABEL_VARIANTS[spec], from_pairs=p / "pairs-rlcd.jsonl",
                               **({"judge": rlaif_judge} if spec == "rescore" else {}))
        else:
            pairs = with_flags(pairs, design=spec.partition("=")[2])
        cmds[f"{v}.pairs"] = [with_flags(pairs, out=d / "pairs-rlcd.jsonl")]
        cmds[f"{v}.pm"] = [with_flags(main["pm-rlcd"][0], out=d / "pm-rlcd", pairs=[d / "pairs-rlcd.jsonl"])]
        cmds[f"{v}.ppo"] = [with_flags(main["ppo-rlcd"][0], out=d / "ppo-rlcd", pm=d / "pm-rlcd")]
        cmds[f"{v}.agreement"] = [with_flags(main["agreement"][0], pm=d / "pm-rlcd", out=d / "agreement.json")]
        cmds[f"{v}.respond"] = [with_flags(a, policy=[f"{v}={d / 'ppo-rlcd'}"],
                                           out_dir=d / Path(flag_value(a, "--out-dir")).name)
                                for a in main["respond"]]
        cmds[f"{v}.compare"] = [with_flags(compare, responses=[resp("responses", "base"), resp("responses", "rlcd"),
                                                               d / "responses" / f"{v}.jsonl"],
                                           focus=v, pm=d / "pm-rlcd", out=d / "compare.json",
                                           **({"benign": [resp("responses-benign", "base"),
                                                          resp("responses-benign", "rlcd"),
                                                          d / "responses-benign" / f"{v}.jsonl"]} if benign else {}))]
    return cmds


def variants_of(args: Args) -> list[str]:
    """The variants to run, checked (a design by loading it) before any work."""
    from rlcd.designs import load_designs

    specs = args.variants if args.variants is not None else list(DEFAULT_VARIANTS.get(args.task, ("logprob", "rescore")))
    names = [variant_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--variants: a variant given twice ({', '.join(specs)})")
    for s in specs:
        if s.startswith("design="):
            load_designs(s.partition("=")[2])
    return specs


def run(args: Args) -> Path:
    """Run (or resume) the pipeline and every variant; returns the report's path."""
    out = Path(args.out)
    specs = variants_of(args)
    pargs = pipeline.Args(**{k: v for k, v in asdict(args).items() if k != "variants"})
    pargs = pipeline.resolve_roles(dataclasses.replace(pargs, out=str(out / "pipeline")))
    cmds = plan(dataclasses.replace(args, variants=specs), pipeline.plan(pargs))
    pipeline.check_plan(cmds)                           # every stage's flags, before any work
    pipeline.run(pargs)
    pipeline.write_commands(out / "commands.sh", cmds, "train.py ablate after the pipeline's (pipeline/commands.sh)")
    pipeline.run_stages(out, list(cmds), cmds)
    report = write_report(out, pargs, specs)
    print(f"[ablate] report: {report}", file=sys.stderr)
    return report


# --- the report ------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _comparison(result: dict | None, a: str, b: str) -> dict | None:
    """a's win rate over b from a compare result that judged (a, b) or (b, a); the latter inverted (ties count
    half, so b's rate over a is 1 - a's, intervals mirrored)."""
    for c in (result or {}).get("comparisons", []):
        if (c["a"], c["b"]) == (a, b):
            return c
        if (c["a"], c["b"]) == (b, a):
            flip = lambda v: None if v is None else 1 - v                              # noqa: E731
            ci = lambda v: None if v is None else [1 - v[1], 1 - v[0]]                  # noqa: E731
            return {"n": c["n"], "win_rate": 1 - c["win_rate"], "win_rate_ci": ci(c["win_rate_ci"]),
                    "lc_win_rate": flip(c.get("lc_win_rate")), "lc_win_rate_ci": ci(c.get("lc_win_rate_ci"))}
    return None


def pair_contrast(path: Path, simulator: str, task: str) -> dict | None:
    """The judge-free contrast of a pairs file (rlcd.contrast.contrast_stats) and its mean label."""
    from models.checkpoint import resolve
    from models.tokenizer import Tokenizer
    from rlcd.constraints import constraints_of
    from rlcd.contrast import contrast_stats

    if not path.is_file():
        return None
    recs = [r for _, r in read_objects(path)[0]]
    if not recs:
        return None
    surface = all(isinstance(r.get("p_plus"), str) for r in recs)          # RLAIF pairs have no p+ / p-
    stats = contrast_stats(recs, Tokenizer.from_dir(resolve(simulator)), surface=surface,
                           constraints=constraints_of(task))
    return stats | {"mean_label": sum(float(r["label"]) for r in recs) / len(recs)}


def policy_row(name: str, pairs: dict | None, agreement: dict | None, results: list[dict | None]) -> dict:
    """One policy's measures, each read from the first of `results` (compare outputs) that has it."""
    have = [r for r in results if r]
    pick = lambda f: next((x for r in have if (x := f(r)) is not None), None)          # noqa: E731
    return {"policy": name, "pairs": pairs,
            "pm": None if agreement is None else {k: agreement.get(k) for k in (
                "n", "accuracy", "accuracy_ci", "n_chosen_shorter", "accuracy_chosen_shorter",
                "accuracy_chosen_shorter_ci", "n_chosen_longer", "accuracy_chosen_longer", "accuracy_chosen_longer_ci")},
            "vs_base": None if name == "base" else pick(lambda r: _comparison(r, name, "base")),
            "vs_rlcd": None if name in ("base", "rlcd") else pick(lambda r: _comparison(r, name, "rlcd")),
            "refusals": pick(lambda r: r.get("refusals", {}).get(name)),
            "benign": pick(lambda r: (r.get("benign") or {}).get("refusals", {}).get(name)),
            "constraints": pick(lambda r: (r.get("constraints") or {}).get(name)),
            "mean_tokens": pick(lambda r: r.get("policies", {}).get(name, {}).get("mean_tokens"))}


def write_report(out: Path, pargs: pipeline.Args, specs: list[str]) -> Path:
    p = out / "pipeline"
    main, base_cmp = _json(p / "compare.json"), _json(out / "compare-base.json")
    rlcd_pairs = pair_contrast(p / "pairs-rlcd.jsonl", pargs.simulator, pargs.task)
    rows = [policy_row("base", None, None, [main]),
            policy_row("rlcd", rlcd_pairs, _json(p / "agreement-rlcd.json"), [main]),
            policy_row("rlaif", pair_contrast(p / "pairs-rlaif.jsonl", pargs.simulator, pargs.task),
                       _json(p / "agreement-rlaif.json"), [base_cmp, main]),
            policy_row("cd", rlcd_pairs, None, [base_cmp, main]),
            policy_row("dpo", rlcd_pairs, None, [base_cmp, main])]
    for spec in specs:
        v, d = variant_name(spec), out / variant_name(spec)
        rows.append(policy_row(v, pair_contrast(d / "pairs-rlcd.jsonl", pargs.simulator, pargs.task),
                               _json(d / "agreement.json"), [_json(d / "compare.json")]) | {"variant": spec})
    judge = (main or {}).get("judge", {})
    result = {"task": pargs.task, "budget": pargs.budget, "policy": pargs.policy, "simulator": pargs.simulator,
              "design": pargs.design, "judge": judge.get("spec"), "judge_accuracy": judge.get("measured"),
              "n_prompts": (main or {}).get("n_prompts"), "rows": rows}
    write_json_atomic(out / "ablation.json", result)
    write_atomic(out / "ablation.md", format_report(result) + "\n")
    return out / "ablation.md"


def format_report(result: dict) -> str:
    from rlcd.judge import describe_accuracy

    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"                               # noqa: E731
    ci = lambda c: "" if not c else f" [{f(c[0])}, {f(c[1])}]"                         # noqa: E731
    rate = lambda r: "-" if not r else f"{f(r['rate'])}{ci(r['rate_ci'])} ({r['change']:+.2f})"   # noqa: E731
    win = lambda c: "-" if not c else (f"{f(c['win_rate'], 3)}{ci(c['win_rate_ci'])}"            # noqa: E731
                                       + (f"; LC {f(c['lc_win_rate'], 3)}" if c.get("lc_win_rate") is not None else ""))
    follows = any(r["constraints"] for r in result["rows"])
    lines = [f"# RLCD ablations: {result['task']}, budget {result['budget']}", "",
             f"Policy `{result['policy']}`, simulator `{result['simulator']}`, the pipeline's design "
             f"`{result['design']}`; judge `{result['judge']}` "
             f"({describe_accuracy(result['judge_accuracy']) if result['judge'] else 'none'}); "
             f"{result['n_prompts']} test prompts.", "",
             "| policy | pairs: refusals o+ / o-, chars o+ / o-, p+/p- token overlap, mean label | PM on human pairs "
             "[95% CI]; preferred shorter / longer | win rate vs base [95% CI]; length-controlled | win rate vs rlcd "
             "| refusals, harmful (change) | refusals, benign (change) | " + ("instructions followed (change) | " if follows else "")
             + "mean tokens |",
             "|---|---|---|---|---|---|---|" + ("---|" if follows else "") + "---|"]
    for r in result["rows"]:
        pr = r["pairs"]
        pairs = "-" if not pr else (f"{f(pr['refusal_plus'])} / {f(pr['refusal_minus'])}, {pr['chars_plus']:.0f} / "
                                    f"{pr['chars_minus']:.0f}, {f(pr.get('surface_overlap'))}, {f(pr['mean_label'])}"
                                    + (f"; follows {f(pr['follows_plus'])} / {f(pr['follows_minus'])}"
                                       if "follows_plus" in pr else ""))
        pm = r["pm"]
        pmt = "-" if not pm or pm.get("accuracy") is None else (
            f"{f(pm['accuracy'], 3)}{ci(pm.get('accuracy_ci'))} (n {pm['n']}); {f(pm['accuracy_chosen_shorter'])}"
            f"{ci(pm.get('accuracy_chosen_shorter_ci'))} / {f(pm['accuracy_chosen_longer'])}"
            f"{ci(pm.get('accuracy_chosen_longer_ci'))}")
        shown = r.get("variant") if r.get("variant") not in (None, r["policy"]) else None
        lines.append(f"| {r['policy']}{' (' + shown + ')' if shown else ''} | {pairs} | {pmt} | "
                     f"{win(r['vs_base'])} | {win(r['vs_rlcd'])} | {rate(r['refusals'])} | {rate(r['benign'])} | "
                     + (f"{rate(r['constraints'])} | " if follows else "") + f"{f(r['mean_tokens'], 1)} |")
    lines += ["", "Pairs: judge-free (rlcd.contrast); for cd and dpo the RLCD pairs they were trained on; the mean "
              "label is 1 for binary labels. PM: eval.py pm-agreement on the human-labelled pairs, intervals "
              "resampling requests. Win rates: the pipeline's judge, 95% bootstrap intervals over prompts; LC: "
              "the win rate at equal lengths (eval.py compare). Refusals: rlcd.judge.is_refusal, change from base."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return pipeline.entry(argv, Args, run, "train.py ablate")
