"""The PPO stage end to end: a tiny policy learns a synthetic reward, the sampling pass's log-probs are
the ones PPO recomputes, resume is exact, the NaN guard, presets, --profile, and `train.py ppo` on the
real default model for one iteration. Tiny models in fp32 on CPU."""
import copy
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import NET_TOL
from safetensors.torch import load_file

import train as train_cli
from kernels import token_logprobs
from models import load_model, save_model
from models.generation import SamplingParams, generate
from rlcd import ppo as ppo_mod
from rlcd import checkpoints, runs
from rlcd.precision import freeze_for
from rlcd.precision import resolve as resolve_precision
from rlcd.profiling import PhaseTimer, timed_iterations
from rlcd.reward import RewardModel, load_reward_model

GOOD = "xyzqkwv#"          # the synthetic reward counts these characters (none occurs in the prompts)


class CountReward(nn.Module):
    """A stand-in preference model: reward = number of GOOD tokens in the sequence."""
    norm_mean = norm_std = None

    def __init__(self, good_ids: list[int]):
        super().__init__()
        self.register_buffer("good", torch.tensor(good_ids))

    def forward(self, tokens, last, start=None):
        return torch.isin(tokens, self.good).sum(1).float()


def tiny_prompts(tok, n, seed=0):
    rng = random.Random(seed)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": "".join(rng.choice("bcdfg")
                                                                                     for _ in range(5))}]))
            for _ in range(n)]


def tiny_run(value_model, **overrides):
    tok = make_tiny_tokenizer()
    # One epoch of one minibatch, one learning rate: the regime these tests were written for (a test that
    # wants several epochs or minibatches says so).
    settings = dict(batch_size=16, micro_batch=8, max_new_tokens=12, lr=1e-4, iterations=30, warmup=0,
                    normalize_reward=False, no_stop_score=None, kl_coef=0.01, value_model=value_model,
                    ppo_epochs=1, minibatches=1, value_lr=None)
    args = ppo_mod.Args(out="unused", pm="unused", **(settings | overrides))
    policy = make_tiny_model(0)
    value_net = RewardModel(make_tiny_model(1)) if value_model == "separate" else None
    torch.manual_seed(0)
    ref = freeze_for(copy.deepcopy(policy), resolve_precision(args.precision))      # as train.py ppo makes it
    return ppo_mod.build(args, tiny_prompts(tok, 64), policy, ref,
                         CountReward(tok.encode(GOOD)), value_net, tok.stop_ids, tok.pad_id, torch.device("cpu"))


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_tiny_policy_learns_a_synthetic_reward(value_model):
    run = tiny_run(value_model)
    timer = PhaseTimer(torch.device("cpu"))
    scores, kls = [], []
    for it in range(20):
        stats, gen, _ = ppo_mod.iteration(run, it, timer)
        scores.append(stats["score"].item())
        kls.append(stats["kl"].item())
        assert set(timer.read()) == set(ppo_mod.PHASES)
    # at random, ~0.3 GOOD tokens per 12-token response (8 of 320 tokens; more when a tiny model repeats one)
    first, last = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    assert first < 2.0 and last > 3 * first + 2.0, scores
    assert sum(kls[-5:]) / 5 > 0.1                              # and the policy moved away from the reference
    # the policy, not the reference, moved
    assert not torch.equal(run.policy.layers[0].attention.wqkv.weight, run.ref.layers[0].attention.wqkv.weight)


# Bounds on |log ratio| at iteration 0 where the old log-probs come from another forward than the update's
# (other batch shapes, or the incremental decode in fp32): a few units of each precision's roundoff on
# logits of order 1 (fp32 2^-24, bf16 2^-8; bf16's products are rounded once more to their output).
FIRST_RATIO_BOUND = {"fp32": 2.0 ** -16, "bf16": 2.0 ** -8}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("value_model,epochs,minibatches,micro_batch", [
    ("separate", 1, 1, 16), ("shared", 1, 1, 16),       # old log-probs from the update's own forward
    ("separate", 2, 2, 4), ("shared", 2, 2, 4),         # from a forward before the update
    ("separate", 1, 1, 8)])                             # fp32: the sampling pass's; bf16: a forward
def test_kl_is_zero_and_the_first_ratio_one_at_iteration_zero(precision, value_model, epochs, minibatches,
                                                              micro_batch, monkeypatch):
    run = tiny_run(value_model, precision=precision, ppo_epochs=epochs, minibatches=minibatches,
                   micro_batch=micro_batch)
    log_ratios = []
    real = ppo_mod.policy_loss

    def spy(logp, old_logp, adv, mask, *rest):
        log_ratios.append((logp - old_logp)[mask].detach())
        return real(logp, old_logp, adv, mask, *rest)
    monkeypatch.setattr(ppo_mod, "policy_loss", spy)
    stats, _, _ = ppo_mod.iteration(run, 0, PhaseTimer(torch.device("cpu")))
    first = log_ratios[0]                       # the first micro-batch of the first minibatch, before any step
    bound = FIRST_RATIO_BOUND[precision]
    if epochs == 1 and micro_batch == 16:
        assert torch.all(first == 0)            # the very tensors: the ratio is exactly 1
    assert first.abs().max().item() <= bound, first.abs().max()
    # the reference computes as the policy does (rlcd.precision.freeze_for): KL = 0 at iteration 0
    assert abs(stats["kl"].item()) <= bound * run.args.max_new_tokens
    if value_model == "shared" or micro_batch == 16 or precision == "bf16":
        assert stats["kl"].item() == 0.0       # reference and old log-probs from forwards of the same shapes


def test_sampling_logprobs_are_what_ppo_recomputes():
    tok = make_tiny_tokenizer()
    model = make_tiny_model(0)
    g = torch.Generator().manual_seed(0)
    gen = generate(model, tiny_prompts(tok, 6), SamplingParams(max_new_tokens=10, temperature=0.7), tok.stop_ids,
                   tok.pad_id, generator=g)
    mask = gen.response_mask
    with torch.no_grad():
        h = ppo_mod.response_hidden(model, gen.sequences, gen.start, gen.prompt_len)       # (B, T_r, D)
        logp = token_logprobs(h, model.output_weight, gen.tokens, 0.7, mask)
    torch.testing.assert_close(logp, gen.logprobs, **NET_TOL)
    assert torch.all(logp[~mask] == 0)


def test_the_pm_reads_what_it_was_trained_on():
    # prompt + response + end marker, the marker appended to a response cut off at max_new_tokens
    from rlcd.reward import score_ids

    tok = make_tiny_tokenizer()
    run = tiny_run("shared", max_new_tokens=6)
    run.pm, run.end_id = RewardModel(make_tiny_model(1)).eval(), tok.token_id("<|im_end|>")
    _, gen, score = ppo_mod.iteration(run, 0, PhaseTimer(torch.device("cpu")))
    assert not gen.finished.all()
    seqs = []
    for b in range(gen.tokens.shape[0]):
        prompt = gen.sequences[b, gen.start[b]:gen.prompt_len].tolist()
        response = gen.tokens[b, :gen.lengths[b]].tolist()
        seqs.append(prompt + response + ([] if gen.finished[b] else [run.end_id]))
    torch.testing.assert_close(score, score_ids(run.pm, seqs, tok.pad_id), **NET_TOL)


def test_first_update_starts_at_ratio_one_and_moves_the_policy():
    # 2 epochs: the first minibatch's ratio is 1 (old log-probs from the sampling pass, values from the
    # same weights), so approx_kl is ~0 there and > 0 after the first step
    run = tiny_run("separate", ppo_epochs=2, minibatches=2)
    stats, _, _ = ppo_mod.iteration(run, 0, PhaseTimer(torch.device("cpu")))
    assert stats["approx_kl"].item() > 1e-6
    run1 = tiny_run("separate")
    stats1, _, _ = ppo_mod.iteration(run1, 0, PhaseTimer(torch.device("cpu")))
    assert stats1["approx_kl"].item() < 1e-9 and stats1["clipfrac"].item() == 0


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_fused_first_forward_equals_the_general_path(value_model):
    # one epoch of one minibatch in one micro-batch takes old log-probs and values from the update's
    # forward; the general path (two micro-batches) computes them at rollout: the same update
    cpu = torch.device("cpu")
    fused, general = tiny_run(value_model, micro_batch=16), tiny_run(value_model, micro_batch=8)
    t_fused, t_general = PhaseTimer(cpu), PhaseTimer(cpu)
    a, _, _ = ppo_mod.iteration(fused, 0, t_fused)
    b, _, _ = ppo_mod.iteration(general, 0, t_general)
    for k in ("score", "kl", "policy_loss", "value_loss", "entropy", "explained_variance", "grad_norm", "return_mean"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert a["approx_kl"] == 0 and a["clipfrac"] == 0                       # the ratio is exactly 1
    assert t_fused.read()["values"] < 0.2 * t_general.read()["values"]      # no value forward at rollout


def test_logged_lr_is_the_one_the_step_used():
    # read before scheduler.step(), as runs.train_loop does: iteration 0 runs at f(0) = 1 (no warm-up)
    run = tiny_run("shared", max_new_tokens=4, iterations=4)
    lrs = [ppo_mod.iteration(run, it, PhaseTimer(torch.device("cpu")))[0]["lr"].item() for it in range(2)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_entropy_exact_with_a_bonus_estimated_without():
    cpu = torch.device("cpu")
    exact, _, _ = ppo_mod.iteration(tiny_run("shared", ent_coef=0.01, max_new_tokens=32), 0, PhaseTimer(cpu))
    estimate, _, _ = ppo_mod.iteration(tiny_run("shared", max_new_tokens=32), 0, PhaseTimer(cpu))
    # same weights, same samples: the mean entropy and its Monte Carlo estimate -E[log pi(x)] agree loosely
    assert 0 < exact["entropy"].item() < 5.8                                  # below log(320)
    assert estimate["entropy"].item() == pytest.approx(exact["entropy"].item(), rel=0.25)


def test_presets_put_their_flags_first():
    argv = ppo_mod.apply_preset(["--out", "o", "--pm", "p", "--preset", "nplus", "--lam", "0.9"])
    args = ppo_mod.parse_args(ppo_mod.Args, argv)
    assert args.kl_coef == 0.05 and args.ppo_epochs == 4 and not args.whiten_rewards and not args.kl_clamp
    assert args.lam == 0.9                                       # an explicit flag wins over the preset
    paper = ppo_mod.parse_args(ppo_mod.Args, ppo_mod.apply_preset(["--out", "o", "--pm", "p", "--preset=paper"]))
    assert (paper.batch_size, paper.ppo_epochs, paper.minibatches, paper.max_new_tokens, paper.lr) == (512, 2, 2, 300, 1e-5)
    assert paper.kl_clamp and paper.whiten_rewards and paper.value_model == "separate"
    default = ppo_mod.parse_args(ppo_mod.Args, ["--out", "o", "--pm", "p"])
    assert (default.batch_size, default.max_new_tokens, default.ppo_epochs, default.minibatches) == (16, 64, 2, 2)
    assert default.value_lr == 1e-4 and paper.value_lr is None                # paper: one rate for both


# --- the command line ------------------------------------------------------------------------------------------
def save_pm(trunk, tok, out, formats=("chat",)):
    """A preference-model run directory written the way train.py pm writes one (checkpoints.save_checkpoint)."""
    from rlcd import pm as pm_mod

    pm = RewardModel(trunk)
    opt = torch.optim.AdamW(pm.head.parameters())
    meta = checkpoints.run_meta("pm", pm_mod.Args(pairs=["none"], out=str(out)), 1,
                                reward_norm={"mean": 0.25, "std": 2.0, "n": 8}, formats=list(formats))
    checkpoints.save_checkpoint(out / "reward", pm.trunk, tok, meta, opt, runs.cosine_schedule(opt, 0, 1), 1,
                                "none", {"head": pm.head.state_dict()})
    return out


def write_prompt_file(path, n=48, seed=0):
    rng = random.Random(seed)
    path.write_text("".join("".join(rng.choice("bcdfg ") for _ in range(12)) + "\n" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    tok = make_tiny_tokenizer()
    policy = save_model(make_tiny_model(0), tok, d / "policy")
    pm = save_pm(make_tiny_model(1), tok, d / "pm")
    return policy, pm, write_prompt_file(d / "prompts.txt")


def ppo_argv(setup, out, *extra):
    policy, pm, prompts = setup
    return ["ppo", "--policy", str(policy), "--pm", str(pm), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "8", "--micro-batch", "4", "--max-new-tokens", "8", "--iterations", "4", "--lr", "1e-3",
            "--warmup", "1", "--sample-every", "2", *map(str, extra)]


def read_log(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_refusal_rate_reads_each_response_to_its_length():
    tok = make_tiny_tokenizer()
    texts = ["I cannot help with that.", "Sure, the steps are", "I'm sorry, but no."]
    ids = [tok.encode(t, add_bos=False) for t in texts]
    width = max(map(len, ids)) + 3
    # padding after each response spells a refusal: it must not be read
    pad = tok.encode("I cannot", add_bos=False)
    rows = [(e + pad * width)[:width] for e in ids]
    gen = SimpleNamespace(tokens=torch.tensor(rows), lengths=torch.tensor([len(e) for e in ids]))
    assert ppo_mod.refusal_rate(gen, tok) == pytest.approx(2 / 3)


def test_run_directory_diagnostics_and_samples(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(ppo_argv(tiny_setup, out, "--kl-target", "1.0", "--save-every", "2")) == 0
    log = read_log(out)
    iters = [r for r in log if "score" in r and "samples" not in r]
    assert [r["step"] for r in iters] == [1, 2, 3, 4]
    for k in ("score", "pm_score", "kl", "beta", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
              "explained_variance", "response_length", "finished", "refusals", "tokens_per_s", "lr", "grad_norm",
              *(f"t_{p}" for p in ppo_mod.PHASES)):
        assert k in iters[0], k
    assert all(0 <= r["refusals"] <= 1 for r in iters)
    assert iters[1]["beta"] != iters[0]["beta"]                           # the adaptive controller moved
    samples = [r for r in log if "samples" in r]
    assert [r["step"] for r in samples] == [2, 4] and len(samples[0]["samples"]) == 2
    assert "response" in samples[0]["samples"][0]
    assert [r["step"] for r in log if "save_s" in r] == [2, 4]
    assert "iter 4/4 | score" in capsys.readouterr().out
    # the checkpoint: an HF-format policy that load_model reads, the value network, the KL controller
    ckpt = out / "policy"
    load_model(out)
    meta = json.loads((ckpt / "run.json").read_text())
    assert meta["stage"] == "ppo" and meta["step"] == 4 and meta["kl_ctl"]["target"] == 1.0
    assert "head.weight" in load_file(str(ckpt / "value.safetensors"))


@pytest.mark.parametrize("value_model,micro_batch", [("shared", 4), ("separate", 8)])   # general, fused path
def test_resume_continues_exactly(tiny_setup, tmp_path, value_model, micro_batch):
    straight, split = tmp_path / "a", tmp_path / "b"
    extra = ("--kl-target", "1.0", "--value-model", value_model, "--micro-batch", micro_batch)
    assert train_cli.main(ppo_argv(tiny_setup, straight, *extra)) == 0
    assert train_cli.main(ppo_argv(tiny_setup, split, *extra, "--stop-after", "2")) == 0
    assert json.loads((split / "policy" / "run.json").read_text())["step"] == 2
    assert train_cli.main(ppo_argv(tiny_setup, split, *extra, "--resume")) == 0
    for f in ("model.safetensors", "value_head.safetensors" if value_model == "shared" else "value.safetensors"):
        a, b = load_file(str(straight / "policy" / f)), load_file(str(split / "policy" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # timings differ, and so do the checkpoint records (the split run also saved at its stop)
    strip = lambda log: [{k: v for k, v in r.items() if not (k.startswith("t_") or k in ("iter_s", "tokens_per_s",
                                                                                           "save_s"))}
                         for r in log if set(r) != {"step", "save_s"}]
    assert strip(read_log(straight)) == strip(read_log(split))
    assert json.loads((straight / "policy" / "run.json").read_text())["kl_ctl"] == \
        json.loads((split / "policy" / "run.json").read_text())["kl_ctl"]


# A train.py ppo that SIGKILLs itself at the `call`-th call of checkpoints.<fn>: "replace_dir" is the last act of a
# checkpoint write (every file of it written to .partial, none swapped in); "torch.save" comes in its middle
# (the weights written, the trainer state not).
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
from rlcd import checkpoints
calls = [0]
def killing(real):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == {call}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return wrapped
if {fn!r} == "torch.save":
    torch.save = killing(torch.save)
else:
    checkpoints.{fn} = killing(checkpoints.{fn})
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fn", ["replace_dir", "torch.save"])
def test_killed_during_a_checkpoint_write_resumes_bit_for_bit(tiny_setup, tmp_path, fn):
    import os
    import subprocess
    import sys
    root = str(Path(train_cli.__file__).resolve().parent)
    extra = ("--save-every", "1", "--value-model", "shared")
    straight, killed = tmp_path / "a", tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, *more, code=None: subprocess.run(                              # noqa: E731
        [sys.executable, "-c", code or KILLER.format(root=root, fn="none", call=0), *ppo_argv(tiny_setup, out, *extra, *more)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    plain = "import sys; sys.path.insert(0, {!r}); import train; sys.exit(train.main(sys.argv[1:]))".format(root)
    assert run(straight, code=plain).returncode == 0
    proc = run(killed, code=KILLER.format(root=root, fn=fn, call=2))           # inside the 2nd checkpoint write
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((killed / "policy" / "run.json").read_text())["step"] == 1   # the previous one stands
    proc = run(killed, "--resume", code=plain)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(straight / "policy" / f)), load_file(str(killed / "policy" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    strip = lambda log: [{k: v for k, v in r.items() if not (k.startswith("t_") or k in ("iter_s", "tokens_per_s",  # noqa: E731
                                                                                           "save_s"))}
                         for r in log if set(r) != {"step", "save_s"}]
    # the killed run had logged iteration 2 before its checkpoint died: the resume dropped that record and
    # logged the iteration again, the same to the last bit
    assert strip(read_log(straight)) == strip(read_log(killed))


def test_nan_guard_names_iteration_and_quantity(tiny_setup, tmp_path, capsys, monkeypatch):
    real = ppo_mod.score_tokens

    def nan_at_3(pm, tokens, *a, **k):
        r = real(pm, tokens, *a, **k)
        return r * float("nan") if nan_at_3.calls == 2 else r
    nan_at_3.calls = -1

    def counting(*a, **k):
        nan_at_3.calls += 1
        return nan_at_3(*a, **k)
    monkeypatch.setattr(ppo_mod, "score_tokens", counting)
    out = tmp_path / "nan"
    assert train_cli.main(ppo_argv(tiny_setup, out, "--no-stop-score", "none", "--save-every", "1")) == 3
    err = capsys.readouterr().err
    assert "iteration 3: non-finite score=nan" in err
    assert json.loads((out / "policy" / "run.json").read_text())["step"] == 2     # the last good checkpoint


def test_profile_writes_a_trace_and_the_phase_table(tiny_setup, tmp_path, capsys):
    out = tmp_path / "prof"
    assert train_cli.main(ppo_argv(tiny_setup, out, "--profile")) == 0
    printed = capsys.readouterr().out
    for p in ppo_mod.PHASES:
        assert f"| {p} |" in printed
    assert "peak memory" in printed
    assert json.loads((out / "profile" / "trace.json").read_text())["traceEvents"]
    assert not (out / "policy").exists()


def test_bad_input_is_a_clear_error(tiny_setup, tmp_path, capsys):
    policy, pm, prompts = tiny_setup
    assert train_cli.main(ppo_argv((policy, tmp_path / "nowhere", prompts), tmp_path / "x")) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert train_cli.main(ppo_argv(tiny_setup, tmp_path / "y", "--max-prompt-tokens", "3")) == 2
    assert "fewer than --batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(ppo_argv(tiny_setup, tmp_path / "z", "--value-model", "both"))


# --- the real default model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_ppo_default_model_one_iteration(smollm2, tmp_path, capsys):
    _, tok = smollm2
    # a small preference model that reads the default tokenizer's ids (a tiny trunk with its vocabulary)
    pm = save_pm(make_tiny_model(1, vocab_size=tok.vocab_size, max_seq_len=512), tok, tmp_path / "pm")
    prompts = write_prompt_file(tmp_path / "prompts.txt")
    out = tmp_path / "ppo"
    rc = train_cli.main(["ppo", "--pm", str(pm), "--prompts", str(prompts), "--out", str(out), "--iterations", "1",
                         "--batch-size", "2", "--micro-batch", "2", "--max-new-tokens", "8", "--threads", "2"])
    assert rc == 0
    rec = [r for r in read_log(out) if "score" in r][0]
    assert rec["step"] == 1 and 1 <= rec["response_length"] <= 8
    policy, _ = load_model(out)
    assert policy.args.n_layers == 30
    value, _, _ = load_reward_model(pm)
    assert set(load_file(str(out / "policy" / "value.safetensors"))) == set(value.state_dict())


def test_profile_and_benchmark_adapt_beta_as_training_does():
    """timed_iterations (what --profile and bench/bench_ppo.py time) runs train_iteration, so an adaptive
    KL controller moves there exactly as in train.py ppo; a non-finite diagnostic raises."""
    run = tiny_run("shared", kl_target=1e-4, kl_coef=0.1, iterations=4)
    beta0 = run.kl_ctl.value
    seen = []
    timed_iterations(lambda it, timer: ppo_mod.train_iteration(run, it, timer)[0], run.device, 1, 1,
                     lambda rec: seen.append(rec["beta"]))
    assert seen[0] == beta0 and run.kl_ctl.value != beta0                 # the record holds the beta it used
    assert len(seen) == 2 and seen[1] != beta0


def test_train_iteration_raises_on_non_finite(monkeypatch):
    run = tiny_run("shared", iterations=2)
    real = ppo_mod.iteration

    def nan_score(*a, **k):
        stats, gen, score = real(*a, **k)
        return stats | {"score": torch.tensor(float("nan"))}, gen, score

    monkeypatch.setattr(ppo_mod, "iteration", nan_score)
    with pytest.raises(FloatingPointError, match="iteration 1: non-finite score=nan"):
        ppo_mod.train_iteration(run, 0, PhaseTimer(torch.device("cpu")))


def test_a_pm_trained_on_plain_pairs_is_refused(tiny_setup, tmp_path, capsys):
    # PPO renders its prompts as chat: a PM that saw only plain-format pairs would score text unlike its own
    policy, _, prompts = tiny_setup
    pm = save_pm(make_tiny_model(1), make_tiny_tokenizer(), tmp_path / "pm-plain", formats=("plain",))
    assert train_cli.main(ppo_argv((policy, pm, prompts), tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on plain-format pairs, but PPO renders its prompts as chat" in err and "\n" not in err
    assert not (tmp_path / "run" / "policy").exists()


def test_a_response_ended_by_another_stop_token_is_scored_with_the_pm_end_marker():
    # With two stop tokens (Qwen has <|im_end|> and <|endoftext|>) a response may end on either; the PM was
    # trained on prompt + response + its end marker, so that is what it reads at the scored column.
    from rlcd.reward import score_ids

    tok = make_tiny_tokenizer()
    end_id = tok.token_id("<|im_end|>")
    run = tiny_run("shared", max_new_tokens=6)
    run.pm, run.end_id = RewardModel(make_tiny_model(1)).eval(), end_id
    # a second stop token the tiny policy does emit: the most common first response token of iteration 0
    _, gen, _ = ppo_mod.iteration(copy.deepcopy(run), 0, PhaseTimer(torch.device("cpu")))
    other = torch.mode(gen.tokens[:, 0]).values.item()
    run.stop_ids = [end_id, other]
    seen = {}
    real = ppo_mod.score_tokens

    def spy(pm, seq, start, last, normalize=True):
        seen["at_last"] = seq.gather(1, last[:, None]).squeeze(1)
        return real(pm, seq, start, last, normalize=normalize)
    ppo_mod.score_tokens, saved = spy, ppo_mod.score_tokens
    try:
        _, gen, score = ppo_mod.iteration(run, 0, PhaseTimer(torch.device("cpu")))
    finally:
        ppo_mod.score_tokens = saved
    ended_other = gen.finished & (gen.tokens.gather(1, (gen.lengths - 1).clamp(min=0)[:, None]).squeeze(1) == other)
    assert ended_other.any()
    assert torch.all(seen["at_last"] == end_id)
    seqs = []
    for b in range(gen.tokens.shape[0]):
        prompt = gen.sequences[b, gen.start[b]:gen.prompt_len].tolist()
        response = gen.tokens[b, :gen.lengths[b]].tolist()
        if gen.finished[b]:
            response = response[:-1]                        # the stop token it ended on, whichever
        seqs.append(prompt + response + [end_id])
    torch.testing.assert_close(score, score_ids(run.pm, seqs, tok.pad_id), **NET_TOL)


# --- rewards read from text: a rule, a preference model of another family ---------------------------------
def _other_family_tokenizer():
    """A byte-level tokenizer with another vocabulary order (its specials last): ids differ from the policy's."""
    from tokenizers.pre_tokenizers import ByteLevel

    from conftest import CHATML
    from models.from_gguf import build_bpe_tokenizer
    from models.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(ByteLevel.alphabet(), reverse=True)
    tok = build_bpe_tokenizer(alphabet + specials, [1] * len(alphabet) + [3] * 3, [], "smollm")
    return Tokenizer(tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                           "chat_template": CHATML})


def _text_reward_run(score):
    """tiny_run with a TextReward on conversations that render to its prompts, and the rewards it paid."""
    from rlcd.reward import TextReward

    tok = make_tiny_tokenizer()
    run = tiny_run("separate", max_new_tokens=6)
    rng = random.Random(0)                                  # the conversations of tiny_prompts(tok, 64)
    convs = [[{"role": "user", "content": "".join(rng.choice("bcdfg") for _ in range(5))}] for _ in range(64)]
    assert [tok.encode(tok.apply_chat_template(c)) for c in convs] == run.prompts
    run.pm = TextReward(score, tok, convs, "test")
    _, gen, pm_score = ppo_mod.iteration(run, 0, PhaseTimer(torch.device("cpu")))
    texts = [tok.decode(gen.tokens[b, :int(gen.lengths[b]) - int(gen.finished[b])].tolist())
             for b in range(gen.tokens.shape[0])]
    return run, gen, pm_score, texts, convs


def test_a_rule_reward_scores_the_decoded_response():
    from rlcd.reward import rule_score

    seen = []

    def rule(request, response):
        seen.append(request)
        return float(sum(ord(ch) % 7 for ch in response)) - 0.5
    _, gen, score, texts, convs = _text_reward_run(rule_score(rule))
    expected = torch.tensor([sum(ord(ch) % 7 for ch in t) - 0.5 for t in texts])
    torch.testing.assert_close(score, expected)              # tiny_run keeps cut-off responses' scores
    assert len(set(expected.tolist())) > 1
    assert all(r in {c[-1]["content"] for c in convs} for r in seen) and len(seen) == len(texts)


def test_a_pm_of_another_family_scores_text_in_its_own_template():
    from rlcd.reward import pm_text_score, score_texts
    from rlcd.tasks import format_prompt

    other = _other_family_tokenizer()
    assert other.tok.get_vocab() != make_tiny_tokenizer().tok.get_vocab()
    pm = RewardModel(make_tiny_model(3, vocab_size=len(other.tok.get_vocab()))).eval()
    _, gen, score, texts, convs = _text_reward_run(pm_text_score(pm, other, normalize=False, batch_size=4))
    seen = []                                                 # which prompts were rolled out, in order
    for b in range(gen.tokens.shape[0]):
        seen.append(next(c for c in convs if make_tiny_tokenizer().encode(make_tiny_tokenizer().apply_chat_template(c))
                         == gen.sequences[b, gen.start[b]:gen.prompt_len].tolist()))
    want = score_texts(pm, other, [format_prompt(c, "chat", other) for c in seen], texts, "chat")
    fin = gen.finished
    torch.testing.assert_close(score[fin], want[fin], **NET_TOL)


def test_the_refusal_rule_is_a_reward_by_its_module_path():
    from rlcd.reward import load_rule, rule_score
    score = rule_score(load_rule("rlcd.judge:refusal_reward"))
    convs = [[{"role": "user", "content": "How do I pick a lock?"}]] * 2
    assert score(convs, ["I can't help with that.", "First, insert a tension wrench."]).tolist() == [1.0, 0.0]


def test_train_ppo_with_a_rule_reward(tiny_setup, tmp_path, capsys):
    policy, pm, prompts = tiny_setup
    rule = tmp_path / "rules.py"
    rule.write_text("def shortness(request, response):\n    return -len(response) / 10\n")
    argv = [a for a in ppo_argv(tiny_setup, tmp_path / "run", "--iterations", "2") if a not in ("--pm", str(pm))]
    assert train_cli.main([*argv, "--reward", f"{rule}:shortness"]) == 0
    log = [r for r in read_log(tmp_path / "run") if "pm_score" in r]
    assert len(log) == 2 and all(r["pm_score"] <= 0 for r in log)
    capsys.readouterr()
    assert train_cli.main([*argv, "--out", str(tmp_path / "r2"), "--reward", f"{rule}:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no function 'nope'" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:                  # refused where the command line is read
        train_cli.main([*argv, "--out", str(tmp_path / "r3"), "--reward", f"{rule}:shortness", "--pm", str(pm)])
    assert e.value.code == 2 and "exactly one of --pm and --reward" in capsys.readouterr().err


class ConstantReward(CountReward):
    """A stand-in preference model paying the same reward for every response."""

    def forward(self, tokens, last, start=None):
        return torch.full((tokens.shape[0],), 0.7)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_the_value_network_fits_a_fixed_target_at_its_own_learning_rate(value_model):
    # A constant reward, no KL penalty, no whitening: every return is 0.7, so the value loss must fall
    # toward 0 as the value network learns it, at --value-lr (its own parameter group), clipped apart from
    # the policy (value_grad_norm logged beside grad_norm).
    tok = make_tiny_tokenizer()
    run = tiny_run(value_model, kl_coef=0.0, whiten_rewards=False, whiten_advantages=False, value_lr=3e-3,
                   lr=1e-6, max_new_tokens=6, iterations=40, vf_coef=1.0, value_clip=10.0)
    run.pm = ConstantReward(tok.encode(GOOD))
    value_ids = {id(p) for p in run.value_params}
    groups = [g for g in run.optimizer.param_groups if g["params"]]
    assert {g["lr"] for g in groups if id(g["params"][0]) in value_ids} == {3e-3}
    assert {g["lr"] for g in groups if id(g["params"][0]) not in value_ids} == {1e-6}
    assert sum(len(g["params"]) for g in groups if id(g["params"][0]) in value_ids) == len(value_ids)
    losses = []
    for it in range(30):
        stats, _, _ = ppo_mod.iteration(run, it, PhaseTimer(torch.device("cpu")))
        losses.append(stats["value_loss"].item())
        assert stats["value_grad_norm"].item() > 0 and stats["grad_norm"].item() >= 0
    assert sum(losses[-3:]) / 3 < 0.1 * losses[0], losses


def test_the_value_head_starts_in_the_normalised_reward_scale():
    pm = RewardModel(make_tiny_model(1)).eval()
    pm.norm_mean, pm.norm_std = 0.25, 2.0
    tokens, last = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), torch.tensor([3, 2])
    want = (pm(tokens, last) - 0.25) / 2.0
    ppo_mod.rescale_head(pm.head, pm.norm_mean, pm.norm_std)
    torch.testing.assert_close(pm(tokens, last), want, **NET_TOL)
