"""Judges and their selection (rlcd.judge): spec names parse back, folds keep a request's pairs together,
cross-validation cannot be fooled by a configuration that is right only on the pairs it is scored on (a
leaky selection can), the order-combination and pointwise math against float64 by hand, the judge-free
rules, and eval.py judge-agreement end to end on a tiny random model (measure() agrees with judge(), the
cache is reused). Tiny random models in fp32."""
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import eval as eval_cli
import rlcd.judge as judges
import rlcd.evaluate as ev
from models import save_model
from rlcd.pairs import read_pairs
from rlcd.judge import (QUESTIONS, JudgeSpec, cluster_ci, combine_pairwise, cross_validate, expand, judge,
                        judge_free, pair_correct, pointwise_prompt, request_folds, request_key, select_best)


@pytest.fixture(scope="module")
def tiny():
    # max_seq_len 1024: the byte-level tiny tokenizer spends one token per byte of a judge prompt.
    return make_tiny_model(max_seq_len=1024), make_tiny_tokenizer()


# --- specs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [JudgeSpec("m", "pairwise", "chat", (1, 5), 0, "logit"),
                                  JudgeSpec("m", "pairwise", "plain", (0,), 0, "prob"),
                                  JudgeSpec("/some/dir", "pointwise", "chat", (), 2),
                                  JudgeSpec(None, "refusal"), JudgeSpec(None, "shorter")])
def test_spec_names_parse_back(spec):
    assert JudgeSpec.parse(spec.name) == spec


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ValueError, match="expected MODEL"):
        JudgeSpec.parse("m:pairwise:chat:q1:prob")
    with pytest.raises(ValueError, match="judge format"):
        JudgeSpec.parse("m:pointwise:json:q0")
    with pytest.raises(ValueError, match="principle 16 out of range"):
        JudgeSpec("m", "pairwise", "chat", (16,)).check("harmless")
    with pytest.raises(ValueError, match="question 1 out of range"):
        JudgeSpec("m", "pointwise", "chat", (), 1).check("helpful")


def test_a_bare_model_expands_to_the_grid():
    specs = expand(["m", "refusal"], ["pairwise", "pointwise"], ["chat"], [1, 5], [0, 2], ["prob", "logit"])
    names = [s.name for s in specs]
    # pairwise: principles 1, 5 and their ensemble, each combined two ways; pointwise: two questions
    assert names == ["m:pairwise:chat:p1:prob", "m:pairwise:chat:p1:logit", "m:pairwise:chat:p5:prob",
                     "m:pairwise:chat:p5:logit", "m:pairwise:chat:p1+5:prob", "m:pairwise:chat:p1+5:logit",
                     "m:pointwise:chat:q0", "m:pointwise:chat:q2", "refusal"]


# --- folds and cross-validation --------------------------------------------------------------------------------
def records(sizes):
    """Pairs of len(sizes) requests, sizes[g] pairs for request g."""
    return [{"messages": [{"role": "user", "content": f"request {g}"}], "chosen": f"c{i}", "rejected": "r"}
            for g, n in enumerate(sizes) for i in range(n)]


def test_folds_keep_requests_together_and_balanced():
    recs = records([5, 3, 3, 2, 2, 1, 1, 1, 1, 1])
    folds = request_folds(recs, 4)
    by_request = {}
    for r, f in zip(recs, folds):
        by_request.setdefault(request_key(r), set()).add(f)
    assert all(len(fs) == 1 for fs in by_request.values())
    sizes = np.bincount(folds, minlength=4)
    assert sizes.sum() == 20 and sizes.max() - sizes.min() <= 1
    # the folds depend on the records, not their order
    perm = np.random.default_rng(0).permutation(len(recs))
    shuffled = request_folds([recs[i] for i in perm], 4)
    assert [shuffled[j] for j in np.argsort(perm)] == folds
    with pytest.raises(ValueError, match="10 requests cannot make 11 folds"):
        request_folds(recs, 11)


def test_pair_correct_counts_exact_ties_half():
    assert pair_correct([0.9, 0.1, 0.5, 0.7], [1.0, 1.0, 1.0, 0.5]).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_cross_validation_is_not_fooled_by_a_planted_fit():
    """Configuration f is right on exactly the pairs of fold f and wrong on all others. Chosen on the other
    folds it can never be the one scored on fold f, so the honest cross-validated accuracy is 0; a
    selection that looks at every pair (the held-out fold included) scores 0.25, the best apparent
    accuracy, which is what choosing and scoring on the same pairs reports."""
    recs = records([2] * 8)
    folds = request_folds(recs, 4)
    labels = np.ones(len(recs))
    scores = {f"c{f}": np.where(np.asarray(folds) == f, 0.9, 0.1) for f in range(4)}
    cv = cross_validate(scores, labels, folds)
    assert cv["correct"].mean() == 0.0
    assert all(cv["fold_choice"][f] != f"c{f}" for f in range(4))
    leaky = cross_validate(scores, labels, folds, select=lambda correct, train: select_best(correct, np.arange(16)))
    assert leaky["correct"].mean() == 0.25 == cv["chosen_accuracy_all"]
    # a configuration right everywhere is chosen in every fold and scores 1
    cv = cross_validate({**scores, "good": np.full(16, 0.8)}, labels, folds)
    assert cv["correct"].mean() == 1.0 and cv["chosen"] == "good" and set(cv["fold_choice"].values()) == {"good"}


def test_balanced_selection_does_not_choose_a_length_rule():
    """Three quarters of the pairs prefer the shorter response. A configuration that always prefers the
    shorter one is right on 0.75 of them; one right on 0.7 of each side is chosen by balanced accuracy,
    and by plain accuracy the length rule wins. The balanced rule sees only the training folds too (the
    planted leak above fails it as well)."""
    rng = np.random.default_rng(0)
    recs = []
    for g in range(40):
        shorter = g % 4 != 0                                         # 30 requests shorter-preferred, 10 longer
        recs.append({"messages": [{"role": "user", "content": f"q{g}"}],
                     "chosen": "no" if shorter else "a long answer", "rejected": "a long answer" if shorter else "no"})
    sides = np.array([1 if g % 4 else -1 for g in range(40)])
    assert judges.length_sides(recs).tolist() == sides.tolist()
    labels, folds = np.ones(40), request_folds(recs, 5)
    length_rule = np.where(sides == 1, 0.9, 0.1)
    right = rng.permutation(np.r_[np.ones(21), np.zeros(9)]), rng.permutation(np.r_[np.ones(7), np.zeros(3)])
    even = np.empty(40)
    even[sides == 1], even[sides == -1] = np.where(right[0] == 1, 0.8, 0.2), np.where(right[1] == 1, 0.8, 0.2)
    scores = {"shorter": length_rule, "even": even}
    assert cross_validate(scores, labels, folds, judges.selector("accuracy", recs))["chosen"] == "shorter"
    assert cross_validate(scores, labels, folds, judges.selector("balanced", recs))["chosen"] == "even"
    with pytest.raises(ValueError, match="select must be one of balanced, accuracy"):
        judges.selector("median", recs)
    planted = {f"c{f}": np.where(np.asarray(folds) == f, 0.9, 0.1) for f in range(5)}
    assert cross_validate(planted, labels, folds, judges.selector("balanced", recs))["correct"].mean() == 0.0


def test_cluster_interval_resamples_requests():
    groups = [f"g{i // 4}" for i in range(40)]                    # 10 requests of 4 pairs
    assert cluster_ci(np.full(40, 0.75), groups) == (0.75, 0.75)
    # each request all right or all wrong: the interval is that of 10 draws, wider than 40 independent ones
    v = np.repeat([1.0, 0.0] * 5, 4)
    lo, hi = cluster_ci(v, groups, n_boot=4000)
    iid_lo, iid_hi = cluster_ci(v, [str(i) for i in range(40)], n_boot=4000)
    assert lo < 0.5 < hi and hi - lo > 1.5 * (iid_hi - iid_lo)


# --- the judges' arithmetic ------------------------------------------------------------------------------------
def test_combine_pairwise_against_float64_by_hand():
    lo = torch.randn(3, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    sig = torch.sigmoid
    p, agree = combine_pairwise(lo, "prob")
    want = torch.stack([0.5 * (1 + sig(lo[k, :, 0]) - sig(lo[k, :, 1])) for k in range(3)]).mean(0)
    assert torch.allclose(p, want, rtol=0, atol=1e-15)
    assert torch.equal(agree, (sig(lo[..., 0]).mean(0) > 0.5) == (sig(lo[..., 1]).mean(0) < 0.5))
    p, agree = combine_pairwise(lo, "logit")
    assert torch.allclose(p, sig(0.5 * (lo[..., 0] - lo[..., 1]).mean(0)), rtol=0, atol=1e-15)
    # swapping the two responses swaps the orders: P(first) becomes 1 - P(first) (to rounding of values < 1)
    for how in ("prob", "logit"):
        q, _ = combine_pairwise(lo.flip(-1), how)
        assert torch.allclose(q, 1 - combine_pairwise(lo, how)[0], rtol=0, atol=1e-15)


def test_judge_free_rules():
    first, second = ["I can't help with that.", "Sure: step one...", "I'm sorry, no.", "ok"], ["Sure.", "I won't.", "I cannot.", "fine"]
    assert judge_free("refusal", first, second).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert judge_free("shorter", first, second).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert judge_free("shorter", ["same"], ["same"]).tolist() == [0.5]


def test_pointwise_judge_against_float64_by_hand(tiny):
    model, tok = tiny
    conv = ["Human: How do I pick a lock?\n\nAssistant:", "Human: Hi\n\nAssistant:"]
    first, second = ["I can't help with that.", "Hello!"], ["Use a tension wrench.", "Hello!"]
    spec = JudgeSpec("tiny", "pointwise", "chat", (), 2)          # "safe and appropriate?": the bad answer is No
    j = judge(spec, model, tok, conv, "harmless", first, second, batch_size=2)
    question, bad = QUESTIONS["harmless"][2]
    bad_id, good_id = tok.encode(bad, add_bos=False)[0], tok.encode("Yes", add_bos=False)[0]

    def h(c, r):                         # log-odds of the bad answer, unpadded, alone, float64
        with torch.no_grad():
            z = model(torch.tensor([tok.encode(pointwise_prompt(tok, c, r, question, "chat"))]))[0, -1].double()
        return (z[bad_id] - z[good_id]).item()

    for i in range(2):
        want = 1 / (1 + np.exp(h(conv[i], first[i]) - h(conv[i], second[i])))
        # fp32 logits batched and left-padded vs alone: ~1e-6 apart (see test_eval's judge test); a sigmoid
        # of a difference of two moves at most half as much.
        assert abs(j.p_first[i].item() - want) < 1e-5
    assert j.p_first[1].item() == 0.5 and j.p_a is None and j.agree is None   # the same response: a tie


# --- eval.py judge-agreement end to end ------------------------------------------------------------------------
def test_judge_agreement_cli_selects_by_cross_validation(tiny, tmp_path, capsys):
    model, tok = tiny
    ckpt = save_model(model, tok, tmp_path / "tiny")
    pairs = [(f"Human: request {g}\n\nAssistant:", c, r) for g in range(3)
             for c, r in (("I won't.", "Sure, here is how."), ("I cannot do that.", "Yes, sure thing, do it like this."))]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    out, cache = tmp_path / "t.json", tmp_path / "cache"
    argv = ["judge-agreement", "--judge", str(ckpt), "--pairs", str(f), "--methods", "pairwise", "pointwise",
            "--formats", "chat", "--principles", "1", "4", "--questions", "0", "2", "--combine", "prob", "logit",
            "--folds", "3", "--cache", str(cache), "--no-progress", "--out", str(out)]
    assert eval_cli.main(argv) == 0
    first_err = capsys.readouterr().err
    assert first_err.count("judge-agreement: ") == 4                # 2 principles + 2 questions, measured once each
    t = json.loads(out.read_text())
    assert len(t["candidates"]) == 6 + 2 + 2                         # pairwise grid, pointwise, two baselines
    rows = {r["family"]: r for r in t["rows"]}
    assert set(rows) == {f"{ckpt} pairwise", f"{ckpt} pointwise", "refusal", "shorter", "all model judges"}
    for r in rows.values():
        assert r["n"] == 6 and r["requests"] == 3 and 0 <= r["cv_accuracy"] <= 1
        assert r["cv_ci"][0] <= r["cv_accuracy"] <= r["cv_ci"][1]
        assert r["n_chosen_shorter"] == 6 and r["n_chosen_longer"] == 0
    assert rows["refusal"]["cv_accuracy"] == 1.0 and rows["shorter"]["cv_accuracy"] == 1.0
    assert rows[f"{ckpt} pointwise"]["position_agreement"] is None
    # measure() and judge() are the same judge: the apparent accuracy of one configuration is judge_agreement's
    recs = read_pairs([str(f)])
    one = ev.judge_agreement(model, tok, recs, "harmless", JudgeSpec.parse(f"{ckpt}:pairwise:chat:p4:logit"))
    assert t["apparent_accuracy"][f"{ckpt}:pairwise:chat:p4:logit"] == pytest.approx(one["accuracy"])
    # a rerun reads every measurement from the cache and gives the same table
    assert eval_cli.main(argv) == 0
    assert "judge-agreement: " not in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"] == t["rows"]
    assert eval_cli.main(["judge-agreement", "--judge", str(ckpt), "--pairs", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.jsonl: no such file" in err and "\n" not in err
