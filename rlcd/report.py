"""OUT/report.md of a pipeline run: settings, each stage's headline figures, PPO and DPO curves, win rates,
samples.

Everything is read back from the files the stages wrote (pairs, metrics.jsonl, agreement-*.json,
compare.json, responses/), so the report can be rebuilt at any time by deleting OUT/stages/report.json
and rerunning the pipeline. The pipeline hands it the stages and policies; nothing here imports it.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlcd.jsonl import read_objects, write_atomic


def _f(v, d: int = 3) -> str:
    return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def _ci(c) -> str:
    """A 95% interval as " [lo, hi]", or nothing when there is none."""
    return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"


def _jsonl(path: Path) -> list[dict]:
    """The records of a stage's JSONL output; none while it does not exist (a stage not run yet)."""
    return [r for _, r in read_objects(path, partial_ok=True)[0]] if path.is_file() else []


# The harmless task's targets for the whole chain: the PM against people on both sides of the length split
# (so that "the shorter wins" cannot pass), a value network that fits, and the RLCD policy against base.
TARGETS = dict(pm_all=0.65, pm_side=0.60, explained_variance=0.3, win_rate=0.65, refusal_gain=0.25,
               over_refusal=0.10)


def chain(pairs: list[dict], agreement: dict, ppo: list[dict], compare: dict, policy: str = "rlcd") -> list[tuple]:
    """The chain pairs -> PM -> PPO -> judge -> policy against TARGETS, link by link: (link, measured,
    target, met) with met None where a link has no target or no figures. `pairs` the RLCD pairs, `agreement`
    the RLCD PM's on human pairs, `ppo` its PPO metrics, `compare` the comparison (compare.json)."""
    from rlcd.judge import is_refusal
    from rlcd.pairs import length_difference

    t, rows = TARGETS, []
    if pairs:
        n = len(pairs)
        dec = [sum(is_refusal(r[k]) for r in pairs) / n for k in ("chosen", "rejected")]
        longer = sum(length_difference(r) > 0 for r in pairs) / n
        rows.append(("pairs", f"o+ declines in {dec[0]:.2f}, o- in {dec[1]:.2f}; o+ the longer in {longer:.2f} "
                     f"(n {n})", "none (judge-free figures)", None))
    if agreement:
        a, sh, lo = (agreement.get(k) for k in ("accuracy", "accuracy_chosen_shorter", "accuracy_chosen_longer"))
        met = None if None in (a, sh, lo) else (a >= t["pm_all"] and min(sh, lo) >= t["pm_side"])
        rows.append(("PM, human pairs", f"{_f(a)}{_ci(agreement.get('accuracy_ci'))} (n {agreement.get('n')}); "
                     f"preferred shorter {_f(sh)}, longer {_f(lo)}",
                     f">= {t['pm_all']} overall, >= {t['pm_side']} on each side", met))
    recs = [r for r in ppo if "score" in r]
    if recs:
        q = max(1, len(recs) // 4)
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
        ev = mean(recs[-q:], "explained_variance") if "explained_variance" in recs[0] else None
        rows.append(("PPO", f"score {mean(recs[:q], 'score'):.2f} -> {mean(recs[-q:], 'score'):.2f} (first -> last "
                     f"quarter), KL {recs[-1].get('kl', float('nan')):.2f}; explained variance, last quarter {_f(ev, 2)}",
                     f"explained variance >= {t['explained_variance']}",
                     None if ev is None else ev >= t["explained_variance"]))
    measured = (compare.get("judge") or {}).get("measured") or {}
    if measured.get("cv_accuracy") is not None:
        rows.append(("judge", f"{measured['cv_accuracy']:.3f}{_ci(measured.get('cv_ci'))} on human pairs "
                     f"(n {measured.get('n')})", "interval above 0.5", (measured.get("cv_ci") or [0])[0] > 0.5))
    comp = next((c for c in compare.get("comparisons", []) if c["a"] == policy and c["b"] == compare.get("baseline")),
                None)
    if comp:
        ok = lambda rate, ci: rate >= t["win_rate"] and ci is not None and ci[0] > 0.5   # noqa: E731
        lc = comp.get("lc_win_rate")
        met = ok(comp["win_rate"], comp.get("win_rate_ci")) and lc is not None and ok(lc, comp.get("lc_win_rate_ci"))
        rows.append((f"{policy} vs {comp['b']}, judged", f"{comp['win_rate']:.3f}{_ci(comp.get('win_rate_ci'))}; "
                     f"length-controlled {_f(lc)}{_ci(comp.get('lc_win_rate_ci'))}",
                     f">= {t['win_rate']}, interval above 0.5, raw and length-controlled", met))
    ref = (compare.get("refusals") or {}).get(policy)
    if ref and compare.get("settings", {}).get("task") == "harmless":
        rows.append((f"{policy}, refusals of harmful prompts", f"{ref['change']:+.2f}{_ci(ref.get('change_ci'))} "
                     f"from {compare.get('baseline')}'s", f">= +{t['refusal_gain']}", ref["change"] >= t["refusal_gain"]))
    ben = ((compare.get("benign") or {}).get("refusals") or {}).get(policy)
    if ben:
        rows.append((f"{policy}, refusals of benign prompts", f"{ben['change']:+.2f}{_ci(ben.get('change_ci'))} "
                     f"from {compare.get('baseline')}'s", f"<= +{t['over_refusal']}", ben["change"] <= t["over_refusal"]))
    return rows


def _chain_section(out: Path) -> list[str]:
    agreement = out / "agreement-rlcd.json"
    compare = out / "compare.json"
    rows = chain(_jsonl(out / "pairs-rlcd.jsonl"), json.loads(agreement.read_text()) if agreement.is_file() else {},
                 _jsonl(out / "ppo-rlcd" / "metrics.jsonl"), json.loads(compare.read_text()) if compare.is_file() else {})
    if not rows:
        return []
    lines = ["## The chain against its targets", "", "| link | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {link} | {m} | {target} | {'-' if met is None else ('yes' if met else '**no**')} |"
              for link, m, target, met in rows]
    first = next((r for r in rows if r[3] is False), None)
    verdict = f"The first link below its target: **{first[0]}**." if first else "No link falls below its target."
    return lines + ["", verdict + " Targets: rlcd/report.py, TARGETS.", ""]


def _pairs_section(out: Path, tok) -> list[str]:
    from rlcd.simulate import pair_stats

    lines = ["## 1. Simulated pairs", "",
             "| method | pairs | mean tokens chosen | mean tokens rejected | identical | word overlap | "
             "ended | mean label |", "|---|---|---|---|---|---|---|---|"]
    files = {m: _jsonl(out / f"pairs-{m}.jsonl") for m in ("rlcd", "rlaif")}
    for m, recs in files.items():
        if not recs:
            continue
        s = pair_stats(recs, tok)
        lines.append(f"| {m} | {s['pairs']} | {_f(s['mean_tokens_chosen'], 1)} | {_f(s['mean_tokens_rejected'], 1)} "
                     f"| {_f(s['frac_identical'], 2)} | {_f(s['mean_word_overlap'], 2)} | {_f(s['frac_ended'], 2)} "
                     f"| {_f(s['mean_label'])} |")
    lines += _pairs_rule_lines(files)
    rlaif = files["rlaif"][:1]
    judge = rlaif[0]["settings"].get("judge") if rlaif else None
    if judge in (None, "self"):
        how = "the simulator's own P(better) as a scorer (the paper's RLAIF)"
    else:
        from rlcd.judge import JudgeSpec, describe_accuracy, measured_accuracy
        task = rlaif[0].get("task", "harmless")
        how = f"P(better) by the judge `{judge}`; {describe_accuracy(measured_accuracy(JudgeSpec.parse(judge), task))}"
    return lines + ["", f"RLCD labels are 1 by construction (o+ preferred); RLAIF labels are {how}.", ""]


def _pairs_rule_lines(files: dict[str, list[dict]]) -> list[str]:
    """For a task whose prompts carry checkable constraints: each pairs file's labels (method -> records)
    against the rule."""
    from rlcd.constraints import constraints_of, pair_rule_stats

    task = next((recs[0].get("task") for recs in files.values() if recs), None)
    cons = constraints_of(task) if task else None
    if not cons:
        return []
    lines = ["", "Checked by rule (rlcd/constraints.py): the share of chosen / rejected responses that meet every "
             "checkable constraint of their prompt, and, over the pairs where exactly one side does, how often the "
             "label prefers it.", "",
             "| method | pairs checked | follows, chosen / rejected | pairs the rule separates | label agrees with the rule |",
             "|---|---|---|---|---|"]
    for m, recs in files.items():
        if recs:
            s = pair_rule_stats(recs, cons)
            lines.append(f"| {m} | {s['checked']} | {_f(s['follows_chosen'], 3)} / {_f(s['follows_rejected'], 3)} "
                         f"| {s['separated']} | {_f(s['label_agrees'], 3)} |")
    return lines


def _pm_section(out: Path) -> list[str]:
    lines = ["## 2. Preference models", "",
             "| PM | train pairs | dev pairs | dev accuracy | dev mean P(chosen) | human-pairs accuracy [95% CI] | "
             "mean P(human-preferred) | acc. where preferred is shorter | acc. where preferred is longer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in ("rlcd", "rlaif"):
        summ = next((r for r in reversed(_jsonl(out / f"pm-{m}" / "metrics.jsonl")) if r.get("summary")), {})
        run = out / f"pm-{m}" / "reward" / "run.json"
        meta = json.loads(run.read_text()) if run.is_file() else {}
        ag_file = out / f"agreement-{m}.json"
        ag = json.loads(ag_file.read_text()) if ag_file.is_file() else {}
        lines.append(f"| {m} | {meta.get('n_train', '-')} | {meta.get('n_dev', '-')} | {_f(summ.get('dev_accuracy'))} "
                     f"| {_f(summ.get('dev_p_chosen'))} | {_f(ag.get('accuracy'))}{_ci(ag.get('accuracy_ci'))} (n={ag.get('n', '-')}) | "
                     f"{_f(ag.get('p_chosen'))} | {_f(ag.get('accuracy_chosen_shorter'))}{_ci(ag.get('accuracy_chosen_shorter_ci'))} "
                     f"(n={ag.get('n_chosen_shorter', '-')}) | {_f(ag.get('accuracy_chosen_longer'))}"
                     f"{_ci(ag.get('accuracy_chosen_longer_ci'))} (n={ag.get('n_chosen_longer', '-')}) |")
    return lines + ["", "Dev: held-out simulated pairs of the PM's own kind. Human pairs: PyRIT's human-scored "
                    "responses to harmful requests (the allowed half; rlcd/human_pairs.py), 95% intervals resampling whole "
                    "requests; the paper's figures on "
                    "2000 HH pairs are 52.4% (RLCD-7B) and 35.6% (RLAIF-7B).", ""]


def _ppo_section(out: Path) -> list[str]:
    from rlcd.plot import render

    lines = ["## 3. PPO", "", "| run | iterations | score, first quarter | score, last quarter | KL, last | "
             "response tokens, last |", "|---|---|---|---|---|---|"]
    figs = []
    for m in ("rlcd", "rlaif"):
        recs = [r for r in _jsonl(out / f"ppo-{m}" / "metrics.jsonl") if "score" in r]
        if not recs:
            continue
        q = max(1, len(recs) // 4)
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
        last = recs[-1]
        lines.append(f"| ppo-{m} | {len(recs)} | {_f(mean(recs[:q], 'score'))} | {_f(mean(recs[-q:], 'score'))} | "
                     f"{_f(last.get('kl'))} | {_f(last.get('response_length'), 1)} |")
        svg = out / f"ppo-{m}.svg"
        keys = [k for k in ("score", "kl", "entropy") if k in recs[0]]
        svg.write_text(render(recs, keys, smooth=max(1, min(5, len(recs) // 4)), title=f"PPO against pm-{m}"))
        figs.append(f"![PPO against pm-{m}]({svg.name})")
    return lines + ["", "Score: the PM's normalised reward of the rollouts; KL: per response, to the frozen base "
                    "model.", "", *figs, ""]


def _dpo_section(out: Path) -> list[str]:
    from rlcd.plot import render

    recs = _jsonl(out / "dpo" / "metrics.jsonl")
    train = [r for r in recs if "margin" in r and "eval" not in r]
    dev = [r for r in recs if r.get("eval") == "dev"]
    if not train:
        return []
    q = max(1, len(train) // 4)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
    last_dev = dev[-1] if dev else {}
    lines = ["## 4. DPO", "", "| run | steps | margin, first quarter | margin, last quarter | accuracy, last quarter | "
             "dev margin | dev accuracy |", "|---|---|---|---|---|---|---|",
             f"| dpo | {len(train)} | {_f(mean(train[:q], 'margin'))} | {_f(mean(train[-q:], 'margin'))} | "
             f"{_f(mean(train[-q:], 'accuracy'))} | {_f(last_dev.get('margin'))} | {_f(last_dev.get('accuracy'))} |"]
    # Dev panels only when there is a curve to draw (the budgets evaluate at the end).
    dev_recs = [{"step": r["step"], "dev_margin": r["margin"], "dev_accuracy": r["accuracy"]} for r in dev]
    keys = ["margin", "accuracy"] + (["dev_margin", "dev_accuracy"] if len(dev) > 1 else [])
    svg = out / "dpo.svg"
    svg.write_text(render(train + dev_recs, keys, smooth=max(1, min(5, len(train) // 4)),
                          title="DPO on the RLCD pairs"))
    return lines + ["", "Margin: the implicit reward of the chosen response minus the rejected one's, "
                    "beta (log pi - log ref); accuracy: the fraction of pairs it orders as labelled.", "",
                    f"![DPO on the RLCD pairs]({svg.name})", ""]


def _compare_section(out: Path) -> list[str]:
    from rlcd.evaluate import format_compare

    f = out / "compare.json"
    if not f.is_file():
        return []
    res = json.loads(f.read_text())
    lines = ["## 5. Policies on held-out prompts", "",
             "Policies: base (the initial model), rlcd (PPO against the RLCD PM), rlaif (PPO against the RLAIF "
             "PM), cd (context distillation: SFT on the RLCD o+ responses), dpo (DPO on the RLCD pairs).", ""]
    if "benign" in res:
        lines += [f"Refusals on benign prompts: the same policies on the {res['benign']['task']} task's test "
                  "prompts, where each refusal is an over-refusal, a policy declining what it should answer, which "
                  "looks harmless without being aligned.", ""]
    if "constraints" in res:
        lines += ["Instructions followed: the share of test prompts whose every checkable constraint the response "
                  "meets, checked by rule (rlcd/constraints.py, IFEval's instruction types), no judge.", ""]
    return lines + [format_compare(res), ""]


def _samples_section(out: Path, policies: list[str], n: int = 3) -> list[str]:
    resp = {p: {r["id"]: r for r in _jsonl(out / "responses" / f"{p}.jsonl")} for p in policies}
    ids = sorted(set.intersection(*(set(v) for v in resp.values()))) if all(resp.values()) else []
    if not ids:
        return []
    lines = ["## 6. Samples (the first prompts by id)", ""]
    for i in ids[:n]:
        msgs = resp[policies[0]][i]["messages"]
        lines += [f"**Prompt:** {msgs[-1]['content'].strip()}", "", "| policy | response |", "|---|---|"]
        for p in policies:
            text = resp[p][i]["response"].strip().replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {p} | {text[:400]}{'…' if len(text) > 400 else ''} |")
        lines.append("")
    return lines


def write_report(out: Path, args, stage_names: list[str], policies: list[str], judges: tuple[str, str]) -> Path:
    """Build OUT/report.md (and its SVG curves) from the stage outputs: `args` the pipeline's settings,
    `stage_names` its stages in order, `policies` the policies compared (the first is the base), `judges`
    the judge specs of the RLAIF labels and of the comparison."""
    from models.checkpoint import resolve
    from models.tokenizer import Tokenizer

    out = Path(out)
    tok = Tokenizer.from_dir(resolve(args.policy))
    stages = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in stage_names
              if (out / "stages" / f"{s}.json").is_file()}
    lines = [f"# RLCD pipeline report: {args.task}, budget {args.budget}", "",
             f"Policy `{args.policy}`, simulator `{args.simulator}`, prompt design `{args.design}`, judge "
             f"`{judges[1]}` (of RLAIF's labels: `{judges[0]}`), seed {args.seed}. Every command is in "
             f"`commands.sh`; the settings in `pipeline.json`.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {v['seconds']:.0f} |" for s, v in stages.items()]
    lines += [""]
    lines += _chain_section(out) + _pairs_section(out, tok) + _pm_section(out) + _ppo_section(out) + _dpo_section(out) \
        + _compare_section(out) + _samples_section(out, policies)
    report = out / "report.md"
    write_atomic(report, "\n".join(lines) + "\n")
    return report
