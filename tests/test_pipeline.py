"""train.py pipeline on a tiny random model: the whole job end to end, its report, and SIGKILL during
every stage followed by the same command, which must finish with the same stage outputs as an
uninterrupted run; the plan of every budget and the roles (simulator, design, judges) it resolves."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

from models import save_model
from rlcd import cli, pipeline

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings for every stage. Temperature 1 without a nucleus: the random tiny model's sharpest token
# is a newline, which a cooler sampler repeats until a response cleans to nothing.
TINY = ["simulate.n_prompts=12", "simulate.max_new_tokens=16", "simulate.batch_size=4", "simulate.max_tries=3",
        "simulate.temperature=1.0", "simulate.top_p=1.0",
        "pm.train_layers=0", "pm.epochs=1", "pm.batch_size=4", "pm.micro_batch=4", "pm.lr=1e-4", "pm.dev=2",
        "pm.norm_samples=4", "pm.norm_max_new_tokens=8", "pm.save_every=1",
        "sft.train_layers=0", "sft.epochs=1", "sft.batch_size=4", "sft.micro_batch=4", "sft.dev=2",
        "sft.save_every=1",
        "dpo.train_layers=0", "dpo.epochs=1", "dpo.batch_size=4", "dpo.micro_batch=4", "dpo.lr=1e-4", "dpo.dev=2",
        "dpo.save_every=1",
        "ppo.iterations=3", "ppo.batch_size=4", "ppo.micro_batch=4", "ppo.max_new_tokens=8", "ppo.train_layers=0",
        "ppo.lr=1e-4", "ppo.save_every=1",
        "respond.n_prompts=6", "respond.max_new_tokens=16", "respond.batch_size=3", "respond.temperature=1.0",
        "respond.top_p=1.0", "compare.batch_size=4", "compare.n_boot=200"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    tok = make_tiny_tokenizer()
    # max_seq_len 1024: the byte-level tokenizer spends a token per byte of a judge prompt.
    policy = save_model(make_tiny_model(0, max_seq_len=1024), tok, d / "policy")
    rng = random.Random(0)
    prompts = d / "prompts.txt"
    prompts.write_text("".join("how do I " + "".join(rng.choice("bcdfgaeiou ") for _ in range(12)) + "?\n"
                               for _ in range(80)))
    human = d / "human.jsonl"
    human.write_text("".join(json.dumps({
        "prompt": tok.apply_chat_template([{"role": "user", "content": f"q{i}"}]), "chosen": "no" * (i + 1),
        "rejected": "yes, here is how", "id": f"h{i}"}) + "\n" for i in range(6)))
    return policy, prompts, human


def command(setup, out) -> list[str]:
    policy, prompts, human = setup
    return [sys.executable, str(ROOT / "train.py"), "pipeline", "--out", str(out), "--policy", str(policy),
            "--judge", str(policy), "--prompts", str(prompts), "--human-pairs", str(human), "--no-progress",
            "--set", *TINY]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}      # the reference run and the resumed one alike


def run_to_end(setup, out) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(setup, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_during(setup, out, stage: str, after: float) -> bool:
    """Start the pipeline and SIGKILL it `after` seconds into `stage`; False if it ended first."""
    p = subprocess.Popen(command(setup, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        for line in p.stderr:
            if f"] {stage}: start" in line:
                time.sleep(after)
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait(timeout=60)
                    return True
                return False
            assert time.monotonic() < deadline, f"the pipeline never reached {stage}"
        return False
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def _records(path: Path) -> dict[str, dict]:
    # "model" names the run directory a response came from, which differs between the two runs.
    return {r["id"]: {k: v for k, v in r.items() if k != "model"} for r in map(json.loads, path.read_text().splitlines())}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("pairs-rlcd.jsonl", "pairs-rlaif.jsonl",
                 *(f"{d}/{p}.jsonl" for d in ("responses", "responses-benign") for p in pipeline.POLICIES)):
        assert _records(a / name) == _records(b / name), name
    for run, sub in (("pm-rlcd", "reward"), ("pm-rlaif", "reward"), ("sft", "policy"), ("dpo", "policy"),
                     ("ppo-rlcd", "policy"), ("ppo-rlaif", "policy")):
        ta, tb = _tensors(a / run / sub), _tensors(b / run / sub)
        assert ta.keys() == tb.keys() and ta, run
        for k in ta:   # resume restores weights, optimiser and RNG bit for bit (rlcd/runs.py)
            assert torch.equal(ta[k], tb[k]), f"{run}: {k}"
        norm_a = json.loads((a / run / sub / "run.json").read_text()).get("reward_norm", {})
        norm_b = json.loads((b / run / sub / "run.json").read_text()).get("reward_norm", {})
        assert {k: v for k, v in norm_a.items() if k != "seconds"} == \
               {k: v for k, v in norm_b.items() if k != "seconds"}, run
    for m in ("rlcd", "rlaif"):
        ga, gb = (json.loads((d / f"agreement-{m}.json").read_text()) for d in (a, b))
        assert ga["accuracy"] == gb["accuracy"] and ga["p_chosen"] == gb["p_chosen"]
    ca, cb = (json.loads((d / "compare.json").read_text()) for d in (a, b))
    assert ca["policies"] == cb["policies"] and ca["benign"]["refusals"] == cb["benign"]["refusals"]
    assert [c["p"] for c in ca["comparisons"]] == [c["p"] for c in cb["comparisons"]]


def test_budget_overrides_and_plan():
    b = pipeline.budget_settings("quick", ["ppo.iterations=8", "simulate.prompts=x.txt", "respond.n_prompts=null"])
    assert b["ppo"]["iterations"] == 8 and b["simulate"]["prompts"] == "x.txt" and b["respond"]["n_prompts"] is None
    assert pipeline.BUDGETS["quick"]["ppo"]["iterations"] != 8          # the preset itself is not changed
    with pytest.raises(ValueError, match="STAGE.FLAG=VALUE"):
        pipeline.budget_settings("quick", ["iterations=8"])
    cmds = pipeline.plan(pipeline.Args(out="o", simulator="big", policy="small"))
    assert list(cmds) == [s for s in pipeline.STAGES if s != "report"]
    assert pipeline.STAGES.index("dpo") == pipeline.STAGES.index("sft") + 1
    pipeline.check_plan(cmds)
    sim = cmds["pairs-rlcd"][0]
    assert sim[sim.index("--model") + 1] == "big"                                   # simulator vs policy
    pm = cmds["pm-rlcd"][0]
    assert pm[pm.index("--model") + 1] == "small" and "--method" not in pm
    (dpo,) = cmds["dpo"]
    assert dpo[:2] == ["train.py", "dpo"] and dpo[dpo.index("--model") + 1] == "small"
    assert dpo[dpo.index("--pairs") + 1] == str(Path("o") / "pairs-rlcd.jsonl")
    assert dpo[dpo.index("--out") + 1] == str(Path("o") / "dpo")
    assert cli.argv_of({"a_b": True, "c": False, "d": None, "e": [1, 2]}) == ["--a-b", "--no-c", "--e", "1", "2"]
    # a preference-model trunk other than the policy: both PMs on it, their reward statistics on the
    # policy's samples; the policy is still what SFT, DPO and PPO train
    cmds = pipeline.plan(pipeline.Args(out="o", policy="small", pm_model="trunk"))
    pipeline.check_plan(cmds)
    for stage in ("pm-rlcd", "pm-rlaif"):
        (pm,) = cmds[stage]
        assert _flag(pm, "--model") == ["trunk"] and _flag(pm, "--norm-policy") == ["small"]
    assert "--norm-policy" not in pipeline.plan(pipeline.Args(out="o", policy="small"))["pm-rlcd"][0]
    for stage in ("sft", "dpo", "ppo-rlcd"):
        assert _flag(cmds[stage][0], "--model" if stage != "ppo-rlcd" else "--policy") == ["small"]


def _flag(argv: list, name: str) -> list[str]:
    """The values of one flag in a command line (up to the next flag)."""
    i = argv.index(name) + 1
    j = next((k for k in range(i, len(argv)) if str(argv[k]).startswith("--")), len(argv))
    return [str(a) for a in argv[i:j]]


def test_every_policy_is_compared_and_harmless_checks_over_refusal():
    cmds = pipeline.plan(pipeline.Args(out="o", task="harmless"))
    (responses, benign), (compare,) = cmds["respond"], cmds["compare"]
    assert [p.partition("=")[0] for p in _flag(responses, "--policy")] == list(pipeline.POLICIES)
    assert "dpo" in pipeline.POLICIES
    assert _flag(compare, "--responses") == [str(Path("o") / "responses" / f"{p}.jsonl") for p in pipeline.POLICIES]
    # the same policies and settings on the helpful task's test split, into their own directory
    assert _flag(benign, "--task") == ["helpful"] and _flag(benign, "--split") == ["test"]
    assert _flag(benign, "--policy") == _flag(responses, "--policy")
    assert _flag(benign, "--n-prompts") == _flag(responses, "--n-prompts")
    assert _flag(compare, "--benign") == [str(Path("o") / "responses-benign" / f"{p}.jsonl") for p in pipeline.POLICIES]
    # with a prompts file of the user's, the benign prompts are still the helpful task's own
    responses, benign = pipeline.plan(pipeline.Args(out="o", prompts="mine.txt"))["respond"]
    assert _flag(responses, "--prompts") == ["mine.txt"] and "--prompts" not in benign
    for task in ("helpful", "outlines"):
        cmds = pipeline.plan(pipeline.Args(out="o", task=task))
        assert len(cmds["respond"]) == 1 and "--benign" not in cmds["compare"][0]


def test_cpu_budget_resolves_the_simulator_and_design_chosen_per_task():
    for task, chosen in pipeline.CPU_PAIRS.items():
        r = pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu", task=task, policy="p"))
        assert (r.simulator, r.design) == (chosen["simulator"], chosen["design"]), task
    table = pipeline.CPU_PAIRS["harmless"]
    r = pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu"))
    assert (r.simulator, r.design, r.pm_model) == (table["simulator"], table["design"],
                                                   table.get("pm_model", r.policy))
    assert pipeline.resolve_roles(r) == r                                           # idempotent
    # a user's flag wins, each on its own
    r = pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu", design="paper-header"))
    assert (r.simulator, r.design) == (table["simulator"], "paper-header")
    r = pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu", simulator="other"))
    assert (r.simulator, r.design) == ("other", table["design"])
    # other tasks and budgets: the policy simulates, with the paper's design
    for budget, task in (("quick", "harmless"), ("quick", "helpful"), ("paper", "harmless"), ("paper", "helpful")):
        r = pipeline.resolve_roles(pipeline.Args(out="o", budget=budget, task=task, policy="p"))
        assert (r.simulator, r.design, r.pm_model) == ("p", pipeline.DEFAULT_DESIGN, "p"), (budget, task)

    # The judges: RLAIF's labels by the simulator when it is not the policy, the comparison by the task's
    # judge; a user's --judge does both.
    assert pipeline.judges(pipeline.Args(out="o", budget="cpu")) == (table["simulator"], "default")
    assert pipeline.judges(pipeline.Args(out="o")) == ("default", "default")
    assert pipeline.judges(pipeline.Args(out="o", budget="cpu", judge="j")) == ("j", "j")
    assert pipeline.judges(pipeline.Args(out="o", budget="cpu", judge="default")) == ("default", "default")
    cmds = pipeline.plan(pipeline.Args(out="o", budget="cpu"))
    pipeline.check_plan(cmds)
    (rlcd,), (rlaif,), (compare,) = cmds["pairs-rlcd"], cmds["pairs-rlaif"], cmds["compare"]
    assert _flag(rlcd, "--model") == _flag(rlaif, "--model") == [table["simulator"]]
    assert _flag(rlcd, "--design") == [table["design"]] and _flag(rlaif, "--judge") == [table["simulator"]]
    assert _flag(compare, "--judge") == ["default"]
    # a mixture of designs goes to the simulation as given; a bad part of one stops the plan, naming the flag
    mix = pipeline.plan(pipeline.Args(out="o", budget="cpu", design="safe-vs-prefill+explain-vs-prefill"))
    assert _flag(mix["pairs-rlcd"][0], "--design") == ["safe-vs-prefill+explain-vs-prefill"]
    with pytest.raises(ValueError, match="--design: 'nope' is neither a built-in design"):
        pipeline.plan(pipeline.Args(out="o", budget="cpu", design="safe-vs-prefill+nope"))

    # pipeline.json holds the resolved roles: the same run resumes when they are given as flags, and a
    # flag that resolves otherwise is another run
    saved = {k: v for k, v in dataclasses.asdict(pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu"))).items()
             if k != "progress"}
    same = pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu", simulator=table["simulator"]))
    assert pipeline.resume_settings(same, saved) == same
    with pytest.raises(ValueError, match=rf"design: '{table['design']}' -> 'paper-header'"):
        pipeline.resume_settings(pipeline.resolve_roles(pipeline.Args(out="o", budget="cpu", design="paper-header")),
                                 saved)


def test_the_report_reads_the_chain_against_its_targets():
    from rlcd.report import TARGETS, chain

    pairs = [{"chosen": "I'm sorry, I can't help with that.", "rejected": "Sure, here is how: first you take the lock, then..."},
             {"chosen": "Sure, a long and careful answer.", "rejected": "Sure."}]
    agreement = {"accuracy": 0.74, "accuracy_ci": [0.68, 0.81], "n": 156, "accuracy_chosen_shorter": 0.81,
                 "accuracy_chosen_longer": 0.47}
    ppo = [{"score": s, "kl": 1.0, "explained_variance": ev} for s, ev in ((0.0, -1.0), (1.0, 0.2), (1.5, 0.3),
                                                                          (2.0, 0.35))]
    compare = {"baseline": "base", "settings": {"task": "harmless"},
               "judge": {"measured": {"cv_accuracy": 0.74, "cv_ci": [0.66, 0.83], "n": 156}},
               "comparisons": [{"a": "rlcd", "b": "base", "win_rate": 0.70, "win_rate_ci": [0.62, 0.77],
                                "lc_win_rate": 0.66, "lc_win_rate_ci": [0.52, 0.79]}],
               "refusals": {"rlcd": {"change": 0.30, "change_ci": [0.2, 0.4]}},
               "benign": {"refusals": {"rlcd": {"change": 0.12, "change_ci": [0.05, 0.2]}}}}
    rows = chain(pairs, agreement, ppo, compare)
    met = {link: ok for link, _, _, ok in rows}
    assert list(met) == ["pairs", "PM, human pairs", "PPO", "judge", "rlcd vs base, judged",
                         "rlcd, refusals of harmful prompts", "rlcd, refusals of benign prompts"]
    assert met == {"pairs": None, "PM, human pairs": False, "PPO": True, "judge": True, "rlcd vs base, judged": True,
                   "rlcd, refusals of harmful prompts": True, "rlcd, refusals of benign prompts": False}
    assert "o+ declines in 0.50, o- in 0.00; o+ the longer in 0.50 (n 2)" in rows[0][1]
    assert "0.35" in rows[2][1]                                 # the last quarter's explained variance
    # each side of a target: the longer side at the bar passes; a length-controlled interval reaching 0.5 fails
    agreement["accuracy_chosen_longer"] = TARGETS["pm_side"]
    compare["comparisons"][0]["lc_win_rate_ci"] = [0.5, 0.8]
    met = {link: ok for link, _, _, ok in chain(pairs, agreement, ppo, compare)}
    assert met["PM, human pairs"] is True and met["rlcd vs base, judged"] is False
    # what was not run has no row; another task has no refusal target
    compare["settings"]["task"] = "helpful"
    assert [r[0] for r in chain([], {}, [], compare)] == ["judge", "rlcd vs base, judged",
                                                         "rlcd, refusals of benign prompts"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_killed_during_every_stage(setup, tmp_path):
    ref = tmp_path / "uninterrupted"
    proc = run_to_end(setup, ref)
    report = (ref / "report.md").read_text()
    assert proc.stdout.strip().endswith("report.md")
    for heading in ("The chain against its targets", "Simulated pairs", "Preference models", "PPO", "DPO",
                    "Policies on held-out prompts", "Samples"):
        assert heading in report, heading
    dpo_section = report.split("## 4. DPO")[1].split("## 5.")[0]
    assert "| dpo | " in dpo_section and "(dpo.svg)" in dpo_section and "| dpo | " in report.split("Samples")[1]
    assert "refusals on benign prompts (helpful)" in report and "over-refusal" in report
    for svg in ("ppo-rlcd.svg", "dpo.svg"):
        assert (ref / svg).read_text().startswith("<svg"), svg
    assert (ref / "commands.sh").is_file()
    saved = json.loads((ref / "pipeline.json").read_text())
    assert (saved["simulator"], saved["design"]) == (str(setup[0]), pipeline.DEFAULT_DESIGN)  # resolved, recorded
    seconds = {s: json.loads((ref / "stages" / f"{s}.json").read_text())["seconds"] for s in pipeline.STAGES}

    out = tmp_path / "killed"
    killed = 0
    for stage in pipeline.STAGES[:-1]:
        # Halfway into the stage as the reference run timed it: past loading, inside its own work.
        killed += kill_during(setup, out, stage, after=0.5 * seconds[stage])
    assert killed >= len(pipeline.STAGES) // 2, f"only {killed} kills landed inside a stage"
    proc = run_to_end(setup, out)
    assert "done before" in proc.stderr
    assert_same_outputs(ref, out)


def test_changed_settings_are_refused(setup, tmp_path):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "pipeline.json").write_text(json.dumps({"task": "helpful"}))
    proc = subprocess.run(command(setup, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "a pipeline with other settings is there" in proc.stderr


def test_resume_is_by_directory_not_by_how_its_path_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "prompts.txt").write_text("q\n")
    saved = {k: v for k, v in dataclasses.asdict(pipeline.Args(out="runs/x", prompts="prompts.txt")).items()
             if k != "progress"}
    # the same directory and file spelled otherwise: resumed with the saved spelling, so every stage's
    # command line is the first invocation's
    args = pipeline.resume_settings(pipeline.Args(out=str(tmp_path / "runs" / "x"), prompts="./prompts.txt"), saved)
    assert (args.out, args.prompts) == ("runs/x", "prompts.txt")
    assert pipeline.resume_settings(pipeline.Args(out="./runs/x", prompts="prompts.txt"), saved).out == "runs/x"
    # a directory that moved: its new path, since the old one names nothing
    moved = pipeline.resume_settings(pipeline.Args(out="elsewhere/x", prompts="prompts.txt"),
                                     saved | {"out": "/gone/runs/x"})
    assert moved.out == "elsewhere/x"
    # a setting that matters is refused, whatever the path
    with pytest.raises(ValueError, match=r"a pipeline with other settings is there \(seed: 0 -> 1\); its path does "
                                         r"not matter, these settings do"):
        pipeline.resume_settings(pipeline.Args(out="./runs/x", prompts="prompts.txt", seed=1), saved)
    with pytest.raises(ValueError, match=r"prompts: 'prompts\.txt' -> 'other\.txt'"):
        pipeline.resume_settings(pipeline.Args(out="runs/x", prompts="other.txt"), saved)
