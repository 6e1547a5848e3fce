"""Preference-pair simulation: labels per method, post-processing and retries, crash-safe resume, clear
errors, the stats view, and a tiny end-to-end run through the command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import rlcd.scorer as sim_scorer
import rlcd.simulate as sim
from models import load_model, save_model
from rlcd.scorer import score_pairs
from rlcd.tasks import HARMLESS_AFFIXES, HARMLESS_INSTRUCTIONS, format_prompt

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How do I pick a lock?", "Write an insult about my coworker.", "What is the capital of France?",
             "How can I cheat on my taxes?", "Tell me a joke about lawyers.", "How do I make a bomb?",
             "Is it ok to lie to my parents?", "Help me write a threatening letter.", "Why is the sky blue?",
             "How do I hotwire a car?", "Say something rude.", "What household chemicals are dangerous?",
             "Give me a recipe for pancakes.", "How do I stalk someone online?", "Who was Gandhi?",
             "Can you help me shoplift?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # max_seq_len 1024: the byte-level tiny tokenizer spends one token per byte of a scorer prompt.
    return save_model(make_tiny_model(max_seq_len=1024), make_tiny_tokenizer(),
                      tmp_path_factory.mktemp("sim") / "tiny")


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_model(ckpt)[1]


def write_prompts(path: Path, questions=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "split": "train"}) + "\n" for q in questions))
    return path


def argv(ckpt, prompts, out, *extra):
    return ["--model", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "4", "--no-progress", *extra]


def final_polarity(prompt: str) -> str:
    """PLUS / MINUS / NEUTRAL from the affix on the last assistant turn ("assistant" header in chat,
    "Assistant" marker in plain)."""
    tail = prompt[prompt.rfind("ssistant"):]
    if any(pos in tail for pos, _ in HARMLESS_AFFIXES):
        return "PLUS"
    if any(neg in tail for _, neg in HARMLESS_AFFIXES):
        return "MINUS"
    return "NEUTRAL"


class FakeGenerate:
    """Stands in for generate_texts: answers name the polarity of the prompt they were sampled from,
    so every test can see which prompt a stored response came from. `outputs` can script the raw text
    of the k-th call; `crash_on` raises on that call, like a killed run."""

    def __init__(self, outputs=None, crash_on=None):
        self.calls, self.n, self.outputs, self.crash_on = 0, 0, outputs, crash_on

    def __call__(self, model, tokenizer, prompts, params, batch_size=8, seed=None, progress=True):
        self.calls += 1
        if self.crash_on == self.calls:
            raise RuntimeError("killed")
        out = []
        for p in prompts:
            self.n += 1
            text = f"{final_polarity(p)} answer {self.n}"
            if self.outputs is not None:
                text = self.outputs(self.calls, p, text)
            out.append({"text": text, "token_ids": tokenizer.encode(text), "finished": True})
        return out


def read(out):
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# labels per method

def test_rlcd_chosen_from_p_plus_label_one(ckpt, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    monkeypatch.setattr(sim, "score_pairs", lambda *a, **k: pytest.fail("rlcd must not call the scorer"))
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), out)) == 0
    recs = read(out)
    assert len(recs) == len(QUESTIONS)
    for r in recs:
        assert set(sim.REQUIRED) <= set(r)
        assert r["chosen"].startswith("PLUS") and r["rejected"].startswith("MINUS")
        assert r["label"] == 1.0 and r["method"] == "rlcd" and r["scorer"] is None
        pos, neg = HARMLESS_AFFIXES[r["affix_index"]]
        assert pos in r["p_plus"] and neg in r["p_minus"]
        # The stored prompt is the neutral one, exactly what a policy is fed.
        assert r["prompt"] == tok.apply_chat_template(r["messages"], add_generation_prompt=True)
        assert r["tries"] == {"chosen": 1, "rejected": 1} and r["ended"]["chosen"] is True


def test_a_design_prefix_is_kept_in_the_response_and_the_design_recorded(ckpt, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(outputs=lambda call, p, text: " how: " + text))
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), out, "--design", "refuse-vs-prefill",
                         "--max-new-tokens", "40")) == 0
    recs = read(out)
    assert len(recs) >= 4                      # the rest are over --max-prompt-tokens with the persona
    for r in recs:
        assert r["rejected"].startswith("Sure, here is how: NEUTRAL answer") and not r["chosen"].startswith("Sure")
        assert r["p_minus"].endswith("<|im_start|>assistant\nSure, here is") and "careful" in r["p_plus"]
        assert r["settings"]["design"]["name"] == "refuse-vs-prefill"
        assert r["ended"] == {"chosen": True, "rejected": True}
    # The prefix counts against --max-new-tokens: 24 byte tokens leave 24 - 13 for what follows "Sure, here is",
    # so o- is cut there (and did not end); o+, unprefixed, has all 24.
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), tmp_path / "cut.jsonl", "--design",
                         "refuse-vs-prefill", "--max-new-tokens", "24")) == 0
    for r in read(tmp_path / "cut.jsonl"):
        assert r["rejected"] == "Sure, here is how: NEUTR" and r["chosen"].startswith("how: NEUTRAL answer")
        assert r["ended"] == {"chosen": True, "rejected": False}
    # a cap the prefix alone fills is refused before any work, naming the flag
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), tmp_path / "none.jsonl", "--design",
                         "refuse-vs-prefill", "--max-new-tokens", "13")) == 2
    assert not (tmp_path / "none.jsonl").exists()
    # a design that cannot be used is refused before any work, naming the flag
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), tmp_path / "x.jsonl", "--design", "nope")) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_within_budget_is_the_engines_cap():
    # the engine counts the stop token against max_new_tokens: 5 tokens and a stop used 6
    tok = make_tiny_tokenizer()
    done = {"text": "abcde", "token_ids": tok.encode("abcde", add_bos=False), "finished": True}
    assert sim.within_budget(done, 6, tok) is done
    assert sim.within_budget(done, 5, tok) == {"text": "abcde", "token_ids": done["token_ids"], "finished": False}
    assert sim.within_budget(done, 3, tok) == {"text": "abc", "token_ids": done["token_ids"][:3], "finished": False}
    cut = {**done, "finished": False}
    assert sim.within_budget(cut, 5, tok) is cut


def test_a_mixture_of_designs_gives_the_prompts_the_designs_in_turn(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(outputs=lambda call, p, text: " how: " + text))
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), out, "--design", "paper-header+refuse-vs-prefill",
                         "--max-new-tokens", "40")) == 0
    recs = sorted(read(out), key=lambda r: QUESTIONS.index(r["messages"][-1]["content"]))
    assert len(recs) >= 8
    # the kept prompts, in the prompt file's order, alternate between the two designs: as many pairs as one
    # design would make, half under each
    names = [r["settings"]["design"]["name"] for r in recs]
    assert names == [("paper-header", "refuse-vs-prefill")[i % 2] for i in range(len(recs))]
    for r, name in zip(recs, names):
        # each pair was made under the design it records
        assert r["rejected"].startswith("Sure, here is how: ") == (name == "refuse-vs-prefill")
        assert any(neg in r["p_minus"] for _, neg in HARMLESS_AFFIXES) == (name == "paper-header")
    # a bad part of a mixture, or a design twice, is refused before any work, naming the flag and the part
    for bad, msg in (("paper-header+nope", "'nope' is neither a built-in design"),
                     ("paper-header+", "an empty design in the mixture"),
                     ("paper-header+paper-header", "design 'paper-header' twice")):
        assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), tmp_path / "x.jsonl", "--design", bad)) == 2
        assert "--design" in (err := capsys.readouterr().err) and msg in err, err
        assert not (tmp_path / "x.jsonl").exists()


def test_rlaif_label_is_p_of_a_from_the_scorer(ckpt, tmp_path, monkeypatch):
    seen = {}

    def fake_score(model, tokenizer, conv, instr, a, b, both_orders=False, batch_size=8):
        seen.update(conv=conv, instr=instr, a=a, b=b, both_orders=both_orders)
        return torch.full((len(a),), 0.25)                                   # P("B")

    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    monkeypatch.setattr(sim, "score_pairs", fake_score)
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:4]), out,
                         "--method", "rlaif", "--judge", "self", "--batch-size", "8", "--both-orders")) == 0
    recs = read(out)
    assert len(recs) == 4
    for r in recs:
        assert r["chosen"].startswith("NEUTRAL") and r["rejected"].startswith("NEUTRAL")
        assert r["chosen"] != r["rejected"]
        assert r["label"] == pytest.approx(0.75)                             # P(A better) = 1 - P(B)
        assert r["scorer"] == {"instruction_index": r["affix_index"], "p_b": 0.25, "a": "chosen",
                               "both_orders": True}
        assert r["p_plus"] is None and r["p_minus"] is None
    # A = chosen, B = rejected; the principle is the one named by affix_index; the conversation is the
    # plain dialogue.
    by_a = {a: i for i, a in enumerate(seen["a"])}
    for r in recs:
        i = by_a[r["chosen"]]
        assert seen["b"][i] == r["rejected"]
        assert seen["instr"][i] == HARMLESS_INSTRUCTIONS[r["affix_index"]]
        assert seen["conv"][i] == f"Human: {r['messages'][0]['content']}\n\nAssistant:"
    assert seen["both_orders"] is True


def test_rescore_label_is_p_of_o_plus_in_either_order(ckpt, tmp_path, monkeypatch):
    # The fake judge prefers the p+ answer with probability 0.9 wherever it is shown.
    def fake_score(model, tokenizer, conv, instr, a, b, both_orders=False, batch_size=8):
        return torch.tensor([0.9 if y.startswith("PLUS") else 0.1 for y in b])

    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    monkeypatch.setattr(sim, "score_pairs", fake_score)
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl"), out, "--method", "rlcd-rescore", "--judge", "self")) == 0
    recs = read(out)
    assert len(recs) == len(QUESTIONS)
    for r in recs:
        assert r["chosen"].startswith("PLUS") and r["rejected"].startswith("MINUS")
        assert r["label"] == pytest.approx(0.9)
        assert r["scorer"]["instruction_index"] == r["affix_index"]
    # Both A/B orders occur (a coin per prompt, as the official code shuffles them).
    assert {r["scorer"]["a"] for r in recs} == {"chosen", "rejected"}


def naive_logprob(model, tok, context: str, response: str) -> float:
    """log p(response | context) by a full forward and a float64 log-softmax, one sequence at a time."""
    from rlcd.reward import encode_parts
    ids, n_prompt = encode_parts(tok, context, response, "chat")
    ids = ids[:-1]                                            # no end marker
    with torch.no_grad():
        logits = model(torch.tensor([ids])).double()[0]       # (T, V)
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))


@pytest.mark.parametrize("design", ["paper-header", "refuse-vs-prefill"])
def test_logprob_label_is_the_contrast_of_the_simulators_own_logprobs(ckpt, tok, tmp_path, monkeypatch, design):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(outputs=lambda call, p, text: " how: " + text))
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:6]), out, "--method", "rlcd-logprob",
                         "--design", design, "--max-new-tokens", "40")) == 0
    recs = read(out)
    assert len(recs) >= 3
    model = load_model(ckpt)[0]
    for r in recs:
        cp_plus, cp_minus = r["p_plus"], r["p_minus"]
        if design == "refuse-vs-prefill":               # the prefix is scored as part of o-, not of the context
            assert cp_minus.endswith("Sure, here is") and r["rejected"].startswith("Sure, here is")
            cp_minus = cp_minus[:-len("Sure, here is")]
        lp = r["scorer"]["logprob"]
        want = {"plus|p+": (cp_plus, r["chosen"]), "plus|p-": (cp_minus, r["chosen"]),
                "minus|p+": (cp_plus, r["rejected"]), "minus|p-": (cp_minus, r["rejected"])}
        for k, (ctx, resp) in want.items():
            assert lp[k] == pytest.approx(naive_logprob(model, tok, ctx, resp), rel=1e-4, abs=1e-3), k
        delta = (lp["plus|p+"] - lp["plus|p-"]) - (lp["minus|p+"] - lp["minus|p-"])
        assert r["label"] == pytest.approx(1 / (1 + math.exp(-delta)))
        assert r["method"] == "rlcd-logprob" and r["settings"]["judge"] is None


def test_from_pairs_relabels_the_same_pairs_without_sampling(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    prompts = write_prompts(tmp_path / "p.jsonl", QUESTIONS[:6])
    src = tmp_path / "rlcd.jsonl"
    assert sim.main(argv(ckpt, prompts, src)) == 0
    monkeypatch.setattr(sim, "generate_texts", lambda *a, **k: pytest.fail("--from-pairs must not sample"))
    out = tmp_path / "soft.jsonl"
    assert sim.main(argv(ckpt, prompts, out, "--method", "rlcd-logprob", "--from-pairs", str(src))) == 0
    a, b = read(src), read(out)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in a] == [(r["id"], r["chosen"], r["rejected"]) for r in b]
    assert all(0 < r["label"] < 1 for r in b) and {r["label"] for r in a} == {1.0}
    # a file of another design is refused, naming the flag, file, line and setting, before any work
    bad = tmp_path / "bad.jsonl"
    assert sim.main(argv(ckpt, prompts, bad, "--method", "rlcd-logprob", "--from-pairs", str(src),
                         "--design", "soft-affixes")) == 2
    err = capsys.readouterr().err
    assert f"--from-pairs {src}:1: settings.design 'paper-header'" in err and "--design 'soft-affixes'" in err
    assert not bad.exists()


def test_rlaif_labels_from_a_judge_spec(ckpt, tmp_path, monkeypatch):
    """--judge SPEC: the labels are P(chosen better) from that judge (rlcd.judge.judge) on the stored
    texts, with the judge's own weights, not the simulating model's."""
    import rlcd.judge as judges
    judge_dir = save_model(make_tiny_model(seed=5, max_seq_len=1024), make_tiny_tokenizer(), tmp_path / "judge")
    seen = {}

    def fake_judge(spec, model, tokenizer, conv, task, first, second, batch_size=8, progress=False):
        seen.update(spec=spec, model=model, conv=conv, first=first, second=second, task=task)
        return sim_scorer.Judgement(p_first=torch.linspace(0.6, 0.8, len(first)))

    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    monkeypatch.setattr(judges, "judge", fake_judge)
    out = tmp_path / "pairs.jsonl"
    spec = f"{judge_dir}:pointwise:chat:q0"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:3]), out, "--method", "rlaif",
                         "--judge", spec)) == 0
    recs = read(out)
    assert len(recs) == 3 and seen["spec"] == judges.JudgeSpec.parse(spec) and seen["task"] == "harmless"
    sim_model = load_model(ckpt)[0]
    assert not torch.equal(seen["model"].tok_embeddings.weight, sim_model.tok_embeddings.weight)
    p = dict(zip(seen["first"], torch.linspace(0.6, 0.8, 3).tolist()))
    for r in recs:
        i = seen["first"].index(r["chosen"])
        assert seen["second"][i] == r["rejected"]
        assert seen["conv"][i] == f"Human: {r['messages'][0]['content']}\n\nAssistant:"
        assert r["label"] == pytest.approx(p[r["chosen"]]) and r["scorer"] == {"judge": spec, "p_first": r["label"]}
        assert r["settings"]["judge"] == spec
    # a spec that does not fit the task is a one-line error naming the flag, before any work
    with pytest.raises(ValueError, match="--judge: judge .*question 7 out of range"):
        sim._check(sim.Args(out=str(tmp_path / "x.jsonl"), method="rlaif", judge=f"{judge_dir}:pointwise:chat:q7"))


def test_context_distillation_reads_neutral_prompt_to_chosen(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:3]), out,
                         "--format", "plain")) == 0
    for r in read(out):
        assert r["prompt"] == f"Human: {r['messages'][0]['content']}\n\nAssistant:"
        assert "(" not in r["prompt"] and r["chosen"].startswith("PLUS")   # no affix leaks into p


# ---------------------------------------------------------------------------------------------
# post-processing, retries and prompt length

def test_postprocessing_retries_and_drops(ckpt, tmp_path, monkeypatch):
    q_empty = QUESTIONS[0]                          # every sample of this prompt is empty: dropped

    def outputs(call, prompt, text):
        if q_empty in prompt:
            return "   "
        if call == 1 and "France" in prompt:        # first try empty after cleaning: re-sampled
            return "Assistant:   "
        return f"Assistant: {text}\nHuman: and now?"

    fake = FakeGenerate(outputs)
    monkeypatch.setattr(sim, "generate_texts", fake)
    out = tmp_path / "pairs.jsonl"
    args = sim.parse_args(sim.Args, argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:4]), out,
                                         "--batch-size", "8", "--max-tries", "3", "--format", "plain"))
    summary = sim.simulate(args)
    assert summary["written"] == 3 and summary["dropped_failed"] == 1
    recs = {r["messages"][0]["content"]: r for r in read(out)}
    assert q_empty not in recs
    for r in recs.values():
        # Leading role marker stripped, cut at the next turn.
        assert r["chosen"].startswith("PLUS answer") and "Human" not in r["chosen"]
    assert recs["What is the capital of France?"]["tries"] == {"chosen": 2, "rejected": 2}
    assert recs["How can I cheat on my taxes?"]["tries"] == {"chosen": 1, "rejected": 1}
    assert fake.calls == 3                           # tries 2 and 3 re-sample only what failed


def test_require_end_resamples_unfinished(ckpt, tmp_path, monkeypatch):
    class Unfinished(FakeGenerate):
        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            return [dict(r, finished=self.calls > 1) for r in out]

    monkeypatch.setattr(sim, "generate_texts", Unfinished())
    out = tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, write_prompts(tmp_path / "p.jsonl", QUESTIONS[:2]), out,
                         "--require-end")) == 0
    assert all(r["tries"] == {"chosen": 2, "rejected": 2} and r["ended"]["rejected"] for r in read(out))


def test_long_prompts_are_dropped_before_sampling(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    out = tmp_path / "pairs.jsonl"
    qs = ["short one?", "x" * 300, "short two?"]
    args = sim.parse_args(sim.Args, argv(ckpt, write_prompts(tmp_path / "p.jsonl", qs), out,
                                         "--max-prompt-tokens", "200", "--n-prompts", "2"))
    summary = sim.simulate(args)
    assert summary["dropped_too_long"] == 1 and summary["written"] == 2
    assert sorted(r["messages"][0]["content"] for r in read(out)) == ["short one?", "short two?"]


# ---------------------------------------------------------------------------------------------
# resume

def test_resume_after_a_crash_and_a_truncated_last_line(ckpt, tmp_path, monkeypatch, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", QUESTIONS[:6])
    out = tmp_path / "pairs.jsonl"
    cmd = argv(ckpt, prompts, out, "--batch-size", "2")        # chunks of 2 prompts, one call each
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(crash_on=3))
    with pytest.raises(RuntimeError, match="killed"):
        sim.main(cmd)
    first = out.read_bytes()
    assert len(read(out)) == 4                                  # two chunks flushed before the crash
    # A write cut short by the kill: half of a record, no newline.
    partial = first.splitlines(keepends=True)[0][:57]
    out.write_bytes(first + partial)

    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    assert sim.main(cmd) == 0
    assert "partial last line" in capsys.readouterr().err
    data = out.read_bytes()
    assert data.startswith(first) and data.endswith(b"\n")      # old pairs kept byte for byte
    recs = read(out)
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6

    # Everything done: a third run writes nothing.
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(crash_on=1))
    assert sim.main(cmd) == 0
    assert json.loads(capsys.readouterr().out)["already_done"] == 6
    assert out.read_bytes() == data


def test_resume_refuses_a_file_from_another_run(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    prompts, out = write_prompts(tmp_path / "p.jsonl", QUESTIONS[:2]), tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, prompts, out)) == 0
    assert sim.main(argv(ckpt, prompts, out, "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert f"{out}: record 1" in err and "seed=0" in err and "seed=3" in err
    assert sim.main(argv(ckpt, prompts, out, "--max-new-tokens", "7")) == 2
    assert "max_new_tokens=6, but this run has max_new_tokens=7" in capsys.readouterr().err
    assert sim.main(argv(ckpt, prompts, out, "--design", "persona")) == 2
    assert "design 'paper-header', but this run has --design 'persona'" in capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    recs[0]["settings"]["design"]["about"] = "an earlier wording"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert sim.main(argv(ckpt, prompts, out)) == 2
    assert "design 'paper-header' as it was written then" in capsys.readouterr().err
    # A prefilled pair made while the prefix came on top of the cap (no "prefix_in_budget") is not resumed.
    old = tmp_path / "prefilled.jsonl"
    assert sim.main(argv(ckpt, prompts, old, "--design", "plain-vs-prefill", "--max-new-tokens", "16")) == 0
    recs = [json.loads(line) for line in old.read_text().splitlines()]
    assert all(r["settings"]["prefix_in_budget"] for r in recs)
    for r in recs:
        del r["settings"]["prefix_in_budget"]
    old.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert sim.main(argv(ckpt, prompts, old, "--design", "plain-vs-prefill", "--max-new-tokens", "16")) == 2
    assert "its reply prefix on top of max_new_tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# malformed input

def test_malformed_pairs_line_names_file_and_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sim, "generate_texts", FakeGenerate())
    prompts, out = write_prompts(tmp_path / "p.jsonl", QUESTIONS[:3]), tmp_path / "pairs.jsonl"
    assert sim.main(argv(ckpt, prompts, out)) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + '{"id": "x", "chosen": \n' + "".join(lines[1:]))
    assert sim.main(argv(ckpt, prompts, out)) == 2
    assert f"{out}:2: malformed JSON" in capsys.readouterr().err
    assert sim.stats_main([str(out), "--no-score"]) == 2
    assert f"{out}:2: malformed JSON" in capsys.readouterr().err
    out.write_text(lines[0] + '{"id": "x"}\n')
    assert sim.stats_main([str(out), "--no-score"]) == 2
    assert f"{out}:2: not a pairs record, missing task" in capsys.readouterr().err


def test_malformed_prompts_line_names_file_and_line(ckpt, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    assert sim.main(argv(ckpt, prompts, tmp_path / "pairs.jsonl")) == 2
    assert f"{prompts}:2: malformed JSON" in capsys.readouterr().err


def test_bad_method_is_one_line(ckpt, tmp_path, capsys):
    assert sim.main(argv(ckpt, tmp_path / "p.jsonl", tmp_path / "o.jsonl", "--method", "dpo")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "simulate: error: --method must be one of rlcd, rlaif, rlcd-rescore, rlcd-logprob, got 'dpo'"


# ---------------------------------------------------------------------------------------------
# stats

def test_pair_stats_counts(tok):
    base = {"method": "rlcd", "format": "chat", "label": 1.0}
    recs = [dict(base, chosen="a b c", rejected="a b c", ended={"chosen": True, "rejected": False},
                 settings={"design": {"name": "safe-vs-prefill"}}),
            dict(base, chosen="x y", rejected="z", ended={"chosen": True, "rejected": True},
                 settings={"design": {"name": "explain-vs-prefill"}}),
            dict(base, chosen="p", rejected="", label=0.5, ended={"chosen": False, "rejected": False},
                 scorer={"p_b": 0.5})]
    s = sim.pair_stats(recs, tok)
    assert s["pairs"] == 3 and s["frac_identical"] == pytest.approx(1 / 3)
    assert s["frac_empty"] == pytest.approx(1 / 3) and s["frac_ended"] == pytest.approx(3 / 6)
    assert s["mean_tokens_chosen"] == pytest.approx((5 + 3 + 1) / 3)      # byte tokens
    assert s["mean_word_overlap"] == pytest.approx((1 + 0 + 0) / 3)
    assert s["mean_label"] == pytest.approx(2.5 / 3) and s["mean_label_margin"] == pytest.approx(2 / 3)
    assert s["mean_stored_p_b"] == pytest.approx(0.5)                     # only the scored record
    assert s["designs"] == "?:1,explain-vs-prefill:1,safe-vs-prefill:1"   # a mixture's designs; ? for none recorded


def test_score_stats_orient_on_chosen(monkeypatch):
    def fake_score(model, tokenizer, conv, instr, a, b, both_orders=False, batch_size=8):
        assert a == ["r1", "r2"] and b == ["c1", "c2"]                     # chosen is option B
        return torch.tensor([0.9, 0.4])

    monkeypatch.setattr(sim, "score_pairs", fake_score)
    recs = [{"id": str(i), "task": "harmless", "affix_index": 0, "chosen": f"c{i}", "rejected": f"r{i}",
             "messages": [{"role": "user", "content": "q"}]} for i in (1, 2)]
    s = sim.score_stats(recs, None, None)
    assert s["scorer_p_chosen"] == pytest.approx(0.65) and s["scorer_agree"] == pytest.approx(0.5)
    assert s["scorer_p_chosen_se"] == pytest.approx(torch.tensor([0.9, 0.4]).std().item() / 2 ** 0.5)
    assert s["scorer_margin"] == pytest.approx((0.8 + 0.2) / 2)


# ---------------------------------------------------------------------------------------------
# end to end through the command line

def test_simulate_and_stats_end_to_end(ckpt, tmp_path):
    prompts, out = write_prompts(tmp_path / "p.jsonl", QUESTIONS[:3]), tmp_path / "runs" / "pairs.jsonl"
    # Temperature 1 and no nucleus: the random tiny model's sharpest token is a space, which a cooler
    # sampler repeats until every response cleans to nothing.
    cmd = [sys.executable, str(ROOT / "train.py"), "simulate", "--method", "rlaif", "--judge", "self", "--n-prompts", "3",
           "--temperature", "1", "--top-p", "1", *argv(ckpt, prompts, out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = read(out)
    assert summary["written"] == len(recs) >= 1
    assert json.loads((out.parent / "pairs.jsonl.config.json").read_text())["method"] == "rlaif"
    # The stored label is what the scorer says about the stored texts, with A = chosen.
    model, tok = load_model(ckpt)
    p_b = score_pairs(model, tok, [format_prompt(r["messages"], "plain") for r in recs],
                      [HARMLESS_INSTRUCTIONS[r["affix_index"]] for r in recs],
                      [r["chosen"] for r in recs], [r["rejected"] for r in recs])
    for r, p in zip(recs, p_b.tolist()):
        assert r["label"] == pytest.approx(1 - p, abs=1e-5)
        assert r["settings"]["max_new_tokens"] == 6 and r["settings"]["temperature"] == 1.0
        assert r["model"] == str(ckpt) and r["seed"] == 0
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stats", str(out), "--batch-size", "2",
                           "--judge", "self"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"| pairs | {len(recs)} |" in proc.stdout and "| scorer_margin |" in proc.stdout
    # a judge spec (here the tiny model itself, pointwise) instead of the simulator's own scorer
    spec = f"{ckpt}:pointwise:chat:q0"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stats", str(out), "--batch-size", "2",
                           "--judge", spec], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"| judge | {spec} |" in proc.stdout and "| judge_p_chosen |" in proc.stdout
    assert "never measured" in proc.stdout                     # its accuracy on human labels is unknown


# ---------------------------------------------------------------------------------------------
# eval.py contrast: simulators x designs on the dev prompts, one table

def test_contrast_command_on_a_tiny_model(ckpt, tmp_path, monkeypatch, capsys):
    import eval as eval_cli
    from rlcd import contrast

    monkeypatch.setattr(sim, "generate_texts", FakeGenerate(outputs=lambda call, p, text:
                                                            "I cannot help with that." if "PLUS" in text else text))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "split": "dev"}) + "\n" for q in QUESTIONS[:6]))
    out, js = tmp_path / "contrast", tmp_path / "contrast.json"
    other = save_model(make_tiny_model(max_seq_len=1024), make_tiny_tokenizer(), tmp_path / "other")
    cmd = ["contrast", "--simulator", str(ckpt), str(other), "--design", "paper-header", "refuse-vs-prefill",
           "--prompts", str(prompts), "--n-prompts", "6", "--max-new-tokens", "40", "--batch-size", "4",
           "--judge", "refusal", "shorter", "--cross", f"{ckpt},{other}", "--no-progress", "--out", str(out),
           "--out-json", str(js)]
    assert eval_cli.main(cmd) == 0
    table = capsys.readouterr().out
    result = json.loads(js.read_text())
    assert [(r["simulator"], r["design"]) for r in result["rows"]] == [
        (str(ckpt), "paper-header"), (str(ckpt), "refuse-vs-prefill"), (str(other), "paper-header"),
        (str(other), "refuse-vs-prefill"), (f"{ckpt} (o+) / {other} (o-)", "paper-header"),
        (f"{ckpt} (o+) / {other} (o-)", "refuse-vs-prefill")]
    header, prefill = result["rows"][:2]
    assert header["pairs"] == 6 and header["refusal_plus"] == 1.0 and header["refusal_minus"] == 0.0
    # the judge-free refusal judge prefers every refusing o+ to a complying o-; one entry per judge
    refusal, shorter = header["judges"]
    assert (refusal["judge"], shorter["judge"]) == ("refusal", "shorter")
    assert refusal["p_plus"] == 1.0 and refusal["prefers_plus"] == 1.0 and not refusal["self_judged"]
    # the judged length split: "shorter" prefers o+ exactly where it is the shorter (here o+ is the longer
    # everywhere, so the other side has no pairs)
    assert (shorter["prefers_plus_longer"], shorter["prefers_plus_shorter"]) == (0.0, None)
    assert refusal["prefers_plus_longer"] == 1.0
    from rlcd.judge import JudgeSpec
    recs = [{"task": "helpful", "messages": [{"role": "user", "content": "q"}], "chosen": c, "rejected": r}
            for c, r in (("ab", "abc"), ("abcd", "a"), ("xyz", "xy"), ("same", "SAME"))]
    st = sim.judge_stats(recs, JudgeSpec.parse("shorter"), None, None)
    assert (st["n_chosen_shorter"], st["n_chosen_longer"]) == (1, 2)           # an equal length is on neither side
    assert (st["accuracy_chosen_shorter"], st["accuracy_chosen_longer"]) == (1.0, 0.0)
    # p+ and p- differ in one affix under the paper's design, in a whole persona and a prefix under the other
    assert 0.85 < header["surface_overlap"] < 1.0 and prefill["surface_overlap"] < header["surface_overlap"]
    assert "| paper-header | 6 |" in table and "judge refusal" in table and "judge shorter" in table
    # the cross row: o+ of the first simulator against o- of the second, prompt by prompt; no p+/p- overlap
    cross = result["rows"][4]
    first = [json.loads(x) for x in (out / f"{ckpt.name}--paper-header.jsonl").read_text().splitlines()]
    second = {r["id"]: r for r in map(json.loads, (out / "other--paper-header.jsonl").read_text().splitlines())}
    assert cross["cross"] and cross["pairs"] == 6 and cross["surface_overlap"] is None
    assert cross["chars_plus"] == sum(len(r["chosen"].strip()) for r in first) / 6
    assert cross["chars_minus"] == sum(len(second[r["id"]]["rejected"].strip()) for r in first) / 6
    assert cross["ended_minus"] == sum(second[r["id"]]["ended"]["rejected"] for r in first) / 6
    assert cross["plus_longer"] == sum(len(r["chosen"].strip()) > len(second[r["id"]]["rejected"].strip())
                                       for r in first) / 6
    assert header["ended_plus"] == sum(r["ended"]["chosen"] for r in first) / 6
    # a rerun resumes every cell without simulating again, and every judgement from its cache
    monkeypatch.setattr(sim, "generate_texts", lambda *a, **k: pytest.fail("resumed cells are not resampled"))
    monkeypatch.setattr(sim, "judge_stats", lambda *a, **k: pytest.fail("cached judgements are not redone"))
    assert eval_cli.main(cmd) == 0
    assert json.loads(js.read_text())["rows"] == result["rows"]
    assert eval_cli.main([*cmd[:cmd.index("--cross")], "--cross", f"{ckpt},nope", *cmd[cmd.index("--cross") + 2:]]) == 2
    assert "--cross" in capsys.readouterr().err
    # surface overlap is a multiset Jaccard
    tok = make_tiny_tokenizer()
    assert contrast.surface_overlap(tok, "abab", "abab") == 1.0
    assert contrast.surface_overlap(tok, "aab", "ab") == pytest.approx(2 / 3)
    # with verifiable constraints, the share of o+ and o- that follow them (pairs with a checkable one only)
    recs = [{"id": "a", "chosen": "no commas", "rejected": "a, b", "p_plus": "x", "p_minus": "y", "method": "rlcd", "format": "chat", "label": 1.0},
            {"id": "b", "chosen": "c, d", "rejected": "c, d", "p_plus": "x", "p_minus": "y", "method": "rlcd", "format": "chat", "label": 1.0},
            {"id": "c", "chosen": "e", "rejected": "f", "p_plus": "x", "p_minus": "y", "method": "rlcd", "format": "chat", "label": 1.0}]
    no_comma = [{"id": "punctuation:no_comma", "kwargs": {}}]
    st = contrast.contrast_stats(recs, tok, constraints={"a": no_comma, "b": no_comma})
    assert (st["follows_plus"], st["follows_minus"], st["follows_pairs"]) == (0.5, 0.0, 2)
    assert "follows_plus" not in contrast.contrast_stats(recs, tok)
    # a bad design is refused before anything is simulated
    d = cmd.index("--design")
    assert eval_cli.main([*cmd[:d + 1], "nope.json", *cmd[d + 3:]]) == 2
    assert "nope.json" in capsys.readouterr().err
