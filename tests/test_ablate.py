"""train.py ablate: the variants' command lines made from the pipeline's, and the whole command end to end on
a tiny random model (the pipeline, a relabelled and a redesigned variant, one report), resumed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import ENV, ROOT, TINY, _flag, setup  # noqa: F401  (setup: the tiny model's fixture)

from rlcd import ablate, pipeline


def test_variants_are_the_pipelines_commands_changed_where_they_say():
    args = ablate.Args(out="o", budget="cpu", variants=["logprob", "rescore", "design=plain-vs-prefill"])
    pargs = pipeline.resolve_roles(pipeline.Args(out=str(Path("o") / "pipeline"), budget="cpu"))
    main = pipeline.plan(pargs)
    cmds = ablate.plan(args, main)
    pipeline.check_plan(cmds)
    p, v = Path("o") / "pipeline", Path("o") / "logprob"
    (pairs,) = cmds["logprob.pairs"]
    assert _flag(pairs, "--method") == ["rlcd-logprob"] and _flag(pairs, "--from-pairs") == [str(p / "pairs-rlcd.jsonl")]
    assert _flag(pairs, "--out") == [str(v / "pairs-rlcd.jsonl")]
    assert _flag(pairs, "--model") == _flag(main["pairs-rlcd"][0], "--model")          # the same simulator
    (rescore,) = cmds["rescore.pairs"]
    assert _flag(rescore, "--method") == ["rlcd-rescore"] and _flag(rescore, "--judge") == [pipeline.judges(pargs)[0]]
    (design,) = cmds["design-plain-vs-prefill.pairs"]
    assert _flag(design, "--design") == ["plain-vs-prefill"] and _flag(design, "--method") == ["rlcd"]
    # the rest of each variant is the pipeline's rlcd line with its own inputs and outputs
    (pm,) = cmds["logprob.pm"]
    assert _flag(pm, "--pairs") == [str(v / "pairs-rlcd.jsonl")] and _flag(pm, "--out") == [str(v / "pm-rlcd")]
    assert _flag(pm, "--lr") == _flag(main["pm-rlcd"][0], "--lr")
    (ppo,) = cmds["logprob.ppo"]
    assert _flag(ppo, "--pm") == [str(v / "pm-rlcd")] and _flag(ppo, "--iterations") == _flag(main["ppo-rlcd"][0], "--iterations")
    harmful, benign = cmds["logprob.respond"]
    assert _flag(harmful, "--policy") == [f"logprob={v / 'ppo-rlcd'}"] and _flag(benign, "--task") == ["helpful"]
    assert _flag(harmful, "--out-dir") == [str(v / "responses")] and _flag(benign, "--out-dir") == [str(v / "responses-benign")]
    (compare,) = cmds["logprob.compare"]
    assert _flag(compare, "--responses") == [str(p / "responses" / "base.jsonl"), str(p / "responses" / "rlcd.jsonl"),
                                             str(v / "responses" / "logprob.jsonl")]
    assert _flag(compare, "--focus") == ["logprob"] and _flag(compare, "--judge") == _flag(main["compare"][0], "--judge")
    (base,) = cmds["compare-base"]
    assert _flag(base, "--focus") == ["base"] and len(_flag(base, "--benign")) == len(pipeline.POLICIES)
    # bad variants are refused before any work
    for bad, msg in ((["nope"], "expected logprob"), (["logprob", "logprob"], "given twice"), (["design=nope.json"], "nope.json")):
        with pytest.raises(ValueError, match=msg):
            ablate.variants_of(ablate.Args(out="o", variants=bad))
    assert ablate.variants_of(ablate.Args(out="o")) == list(ablate.DEFAULT_VARIANTS["harmless"])


def test_a_comparison_read_from_either_order():
    res = {"comparisons": [{"a": "rlcd", "b": "dpo", "n": 4, "win_rate": 0.75, "win_rate_ci": [0.5, 1.0],
                            "lc_win_rate": 0.6, "lc_win_rate_ci": [0.4, 0.8]}]}
    assert ablate._comparison(res, "rlcd", "dpo")["win_rate"] == 0.75
    flip = ablate._comparison(res, "dpo", "rlcd")
    assert flip["win_rate"] == 0.25 and flip["win_rate_ci"] == [0.0, 0.5]
    assert flip["lc_win_rate"] == pytest.approx(0.4) and flip["lc_win_rate_ci"] == pytest.approx([0.2, 0.6])
    assert ablate._comparison(res, "dpo", "base") is None


@pytest.mark.slow
def test_ablate_end_to_end_on_a_tiny_model(setup, tmp_path):  # noqa: F811
    policy, prompts, human = setup
    out = tmp_path / "ablate"
    cmd = [sys.executable, str(ROOT / "train.py"), "ablate", "--out", str(out), "--policy", str(policy),
           "--judge", str(policy), "--prompts", str(prompts), "--human-pairs", str(human), "--no-progress",
           "--variants", "logprob", "design=paper-system", "--set", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["base", *pipeline.POLICY_RUNS, "logprob", "design-paper-system"]
    for name in ("logprob", "design-paper-system"):
        r = rows[name]
        assert r["vs_base"]["n"] == r["vs_rlcd"]["n"] == 6 and 0 <= r["vs_base"]["win_rate"] <= 1
        assert r["pm"]["n"] == 6 and r["refusals"]["n"] == 6 and r["benign"]["n"] == 6
        assert r["pairs"]["pairs"] > 0
    assert rows["logprob"]["pairs"]["mean_label"] < 1 and rows["design-paper-system"]["pairs"]["mean_label"] == 1
    for name in ("rlaif", "cd", "dpo"):              # base vs each from compare-base, rlcd vs each from the pipeline
        assert rows[name]["vs_base"]["n"] == 6 and rows[name]["vs_rlcd"]["n"] == 6
    report = (out / "ablation.md").read_text()
    assert "| logprob |" in report and "| design-paper-system (design=paper-system) |" in report
    # a rerun skips every finished stage and writes the same report
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "logprob.ppo: done before" in again.stderr
    assert (out / "ablation.md").read_text() == report
