"""DPO (train.py dpo): the loss and its gradient against float64 on full logits, the implicit reward exactly
0 at step 0 (fp32 and bf16), resume bit for bit (after --stop-after and after a SIGKILL inside a
checkpoint write), world size 2 equal to 1, bad input refused in one line, and a tiny run that raises the
chosen-vs-rejected margin into a policy that eval.py respond loads. Tiny models on CPU."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from numerics import U32, assert_within, fp32_sum_tol
from safetensors.torch import load_file
from test_distributed import run_ranks
from test_distributed_train import _stage_rank, assert_same_run, one_process
from test_kernels_logprob import _fp32_bounds
from test_pm import tiny_dir, write_marker_pairs  # noqa: F401  (tiny_dir: test_pm's fixture, the tiny model saved)

import eval as eval_cli
import train as train_cli
from models import load_model, save_model
from rlcd import dpo as dpo_mod
from rlcd.dpo import dpo_loss, sequence_logprobs
from rlcd.sft import response_mask


# --- the loss ----------------------------------------------------------------------------------------------------
def test_dpo_loss_by_hand():
    # one pair: policy log-probs (-3, -5), reference (-4, -4): d = beta * ((-3 + 4) - (-5 + 4)) = 2 beta
    logp, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    loss, m = dpo_loss(logp, ref, 1.0, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))      # -log sigma(1)
    assert (m["reward_chosen"].item(), m["reward_rejected"].item(), m["margin"].item()) == (0.5, -0.5, 1.0)
    assert (m["accuracy"].item(), m["logp_chosen"].item(), m["logp_rejected"].item()) == (1.0, -3.0, -5.0)
    # conservative DPO: -(1 - eps) log sigma(d) - eps log sigma(-d)
    loss, _ = dpo_loss(logp, ref, 1.0, beta=0.5, label_smoothing=0.2)
    want = -0.8 * math.log(1 / (1 + math.exp(-1.0))) - 0.2 * math.log(1 / (1 + math.exp(1.0)))
    assert loss.item() == pytest.approx(want)


def test_loss_and_gradient_match_float64():
    """sequence_logprobs + dpo_loss (soft labels, label smoothing) and the gradient they send into the
    policy's hidden states, against the same math in float64 on full (2B, T, V) logits. Bounds from the
    arithmetic (tests/numerics.py): each token's log-prob and its gradient as the log-prob kernel's test
    derives them (_fp32_bounds); a sequence adds its n tokens' errors and an n-term sum; the pair's
    d = beta ((lc - rc) - (lr - rr)) adds the four sequences' errors times beta and a rounding per
    operation; the loss moves by |dl/dd| = |sigma(d) - y| <= 1 times that; the gradient into a sequence
    by |d sigma / dd| <= 1/4 times that, times the magnitude of the token's own gradient."""
    policy, ref = make_tiny_model(0), make_tiny_model(1)       # a reference unlike the policy: rewards are not 0
    g = torch.Generator().manual_seed(0)
    B, T, beta, eps = 3, 12, 0.5, 0.1
    tokens = torch.randint(3, 300, (2 * B, T), generator=g)                        # (2B, T): chosen, then rejected
    prompt_len, seq_len = torch.tensor([3, 5, 2, 3, 5, 2]), torch.tensor([12, 9, 7, 10, 12, 4])
    label = torch.tensor([1.0, 0.7, 1.0])
    h = policy(tokens, return_hidden=True).detach().requires_grad_()               # (2B, T, D)
    W = policy.output_weight.detach()
    with torch.no_grad():
        h_ref, W_ref = ref(tokens, return_hidden=True), ref.output_weight
    logp = sequence_logprobs(h, W, tokens, prompt_len, seq_len)                     # (2B,)
    ref_logp = sequence_logprobs(h_ref, W_ref, tokens, prompt_len, seq_len)
    loss, m = dpo_loss(logp, ref_logp, label, beta, eps)
    loss.backward()

    # float64: log-softmax of the full logits, response tokens summed per row, the DPO formula written out
    mask = response_mask(prompt_len, seq_len, T)                                    # (2B, T-1)
    def seq64(hh, ww):         # (2B,) sequence log-probs, (2B, T-1) token log-probs, (2B, T-1, V) log-softmax
        logz = torch.log_softmax(hh.double()[:, :-1] @ ww.double().T, -1)
        tok_lp = logz.gather(-1, tokens[:, 1:, None])[..., 0] * mask
        return tok_lp.sum(-1), tok_lp.detach(), logz.detach()
    h64 = h.detach().double().requires_grad_()
    lp64, tok_lp, logz = seq64(h64, W)
    lp64.retain_grad()
    rp64, tok_rp, _ = seq64(h_ref, W_ref)
    x = beta * ((lp64[:B] - rp64[:B]) - (lp64[B:] - rp64[B:]))                      # (B,)
    y = eps + (1 - 2 * eps) * label.double()
    losses = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
    losses.mean().backward()

    n = int(mask.sum(-1).max())                                                     # terms of a sequence's sum

    def seq_bound(hh, ww, tok_lp, g_seq):        # a sequence's log-prob error; its tokens' dh (g_seq exact)
        g_tok = (g_seq[:, None] * mask).float()                                     # (2B, T-1)
        b_lp, _, b_dh, _ = _fp32_bounds(hh[:, :-1], ww, tokens[:, 1:], 1.0, mask, g_tok, torch.zeros_like(g_tok))
        return b_lp.sum(-1) + fp32_sum_tol(n, tok_lp.abs().sum(-1)), b_dh
    b_lp, b_dh = seq_bound(h, W, tok_lp, lp64.grad)
    b_rp, _ = seq_bound(h_ref, W_ref, tok_rp, torch.zeros(2 * B))
    mag = lp64.abs() + rp64.abs()
    b_x = (beta * (b_lp + b_rp + 4 * U32 * mag)).view(2, B).sum(0) + 4 * U32 * x.abs()      # (B,)
    b_each = (torch.sigmoid(x) - y).abs() * b_x + 8 * U32 * (x.abs() + 1)
    assert_within(loss, losses.mean(), b_each.mean() + fp32_sum_tol(B, losses.abs().sum()) / B, "loss")
    assert_within(logp, lp64, b_lp, "log pi(y|x)")
    assert_within(m["reward_chosen"], beta * (lp64[:B] - rp64[:B]).mean(),
                  beta * (b_lp + b_rp)[:B].mean() + 8 * U32 * beta * mag[:B].mean(), "reward_chosen")
    # The gradient: b_dh for the exact upstream gradient; plus the upstream's own error, beta / B * 1/4 * b_x,
    # times the magnitude of d log p / dh, sum_v |1[v = y] - p_v| |W_v|.
    onehot = F.one_hot(tokens[:, 1:], W.shape[0]).double()
    dlp_dh = (onehot - logz.exp()).abs() @ W.double().abs()               # (2B, T-1, D)
    b_up = (beta / B * 0.25 * b_x).repeat(2)[:, None, None] * mask[..., None]
    assert_within(h.grad[:, :-1], h64.grad[:, :-1], b_dh + b_up * dlp_dh, "dL/dh")
    assert torch.all(h.grad[:, -1] == 0) and torch.all(h.grad[:, :-1][~mask] == 0)   # prompt, pad, last column


# --- the stage end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A separable preference: the chosen response holds a '#', the rejected one does not (tests/test_pm.py)."""
    return write_marker_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 48)


def dpo_argv(pairs, out, model, *extra):
    return ["--pairs", str(pairs), "--out", str(out), "--model", str(model), "--no-progress", "--save-every", "1000",
            "--eval-every", "0", "--batch-size", "8", "--micro-batch", "4", "--dev", "8", *map(str, extra)]


def read_log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out, timed: bool = True) -> list[dict]:
    """The run's per-step records (timed=False: without their timings, which differ between runs)."""
    return [{k: v for k, v in r.items() if timed or k not in ("step_s", "tokens_per_s")}
            for r in read_log(out) if "grad_norm" in r]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_implicit_reward_is_exactly_zero_at_step_0(tiny_dir, pairs, tmp_path, precision):
    # The reference is the policy bit for bit (rlcd.precision.freeze_for), so every pair's implicit reward is
    # 0: the means are 0, no pair is ordered (accuracy 0 under a strict >), and the loss is log 2.
    out = tmp_path / "run"
    assert dpo_mod.main(dpo_argv(pairs, out, tiny_dir, "--max-steps", "1", "--precision", precision)) == 0
    (first,) = steps(out)
    assert (first["reward_chosen"], first["reward_rejected"], first["margin"], first["accuracy"]) == (0, 0, 0, 0)
    assert first["loss"] == pytest.approx(math.log(2), abs=4 * U32) and first["grad_norm"] > 0
    assert json.loads((out / "policy" / "run.json").read_text())["precision"] == precision


def test_dpo_raises_the_margin_into_a_policy_eval_loads(tiny_dir, pairs, tmp_path):
    out = tmp_path / "dpo"
    assert train_cli.main(["dpo", *dpo_argv(pairs, out, tiny_dir, "--lr", "1e-2", "--max-steps", "12",
                                            "--warmup", "1", "--eval-every", "6")]) == 0
    log = steps(out)
    assert len(log) == 12 and {"loss", "reward_chosen", "reward_rejected", "accuracy", "margin", "p_chosen",
                               "logp_chosen", "logp_rejected", "grad_norm", "lr"} <= set(log[0])
    assert log[0]["margin"] == 0 and sum(r["margin"] for r in log[-3:]) / 3 > 1.0
    assert sum(r["loss"] for r in log[-3:]) / 3 < 0.5 * math.log(2)
    dev = [r for r in read_log(out) if r.get("eval") == "dev"]
    assert [r["step"] for r in dev] == [6, 12] and dev[-1]["n"] == 8
    assert dev[-1]["margin"] > dev[0]["margin"] > 0 and dev[-1]["accuracy"] > 0.5
    meta = json.loads((out / "policy" / "run.json").read_text())
    assert meta["stage"] == "dpo" and meta["step"] == 12 and meta["reference"] == str(tiny_dir)
    # The run directory is a policy, as an SFT or PPO run's: eval.py respond answers with it.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "abcd", "split": "test"}) + "\n")
    assert eval_cli.main(["respond", "--policy", f"dpo={out}", "--prompts", str(prompts), "--out-dir",
                          str(tmp_path / "r"), "--max-new-tokens", "4", "--no-progress"]) == 0
    (rec,) = [json.loads(x) for x in (tmp_path / "r" / "dpo.jsonl").read_text().splitlines()]
    assert rec["policy"] == "dpo" and rec["model"] == str(out)


def test_resume_gives_the_same_weights_and_metrics(tiny_dir, pairs, tmp_path):
    common = ("--lr", "3e-3", "--max-steps", "4", "--warmup", "1", "--label-smoothing", "0.1")
    assert dpo_mod.main(dpo_argv(pairs, tmp_path / "a", tiny_dir, *common)) == 0
    assert dpo_mod.main(dpo_argv(pairs, tmp_path / "b", tiny_dir, *common, "--stop-after", "2")) == 0
    assert json.loads((tmp_path / "b" / "policy" / "run.json").read_text())["step"] == 2
    assert dpo_mod.main(dpo_argv(pairs, tmp_path / "b", tiny_dir, *common, "--resume")) == 0
    a, b = (load_file(str(tmp_path / d / "policy" / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps(tmp_path / "a", timed=False) == steps(tmp_path / "b", timed=False)


def test_killed_during_a_checkpoint_write_resumes_bit_for_bit(tiny_dir, pairs, tmp_path):
    # train.py dpo SIGKILLed inside its 2nd checkpoint write (every file written to .partial, none swapped
    # in): the checkpoint of step 1 stands, and --resume ends where an uninterrupted run does.
    import os
    import subprocess
    import sys

    from test_ppo import KILLER
    root = str(dpo_mod.__file__).rsplit("/rlcd/", 1)[0]
    argv = ["dpo", *dpo_argv(pairs, "OUT", tiny_dir, "--lr", "3e-3", "--max-steps", "3", "--save-every", "1")]
    plain = f"import sys; sys.path.insert(0, {root!r}); import train; sys.exit(train.main(sys.argv[1:]))"

    def run(out, *more, code=plain):
        return subprocess.run([sys.executable, "-c", code, *[str(out) if a == "OUT" else a for a in argv], *more],
                              cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
    assert run(tmp_path / "a").returncode == 0
    proc = run(tmp_path / "b", code=KILLER.format(root=root, fn="replace_dir", call=2))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "policy" / "run.json").read_text())["step"] == 1
    proc = run(tmp_path / "b", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / "policy" / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps(tmp_path / "a", timed=False) == steps(tmp_path / "b", timed=False)


def test_world_two_with_fsdp_equals_world_one(tiny_dir, pairs, tmp_path):
    # Policy and reference sharded over 2 ranks, 4 pairs each per step in micro-batches of 2; dev pairs
    # across the ranks: the loss, metrics and weights of one process with the same global batch.
    argv = ("--lr", "1e-3", "--max-steps", "2", "--warmup", "0", "--micro-batch", "2", "--eval-every", "1")
    one_process("dpo", dpo_argv(pairs, tmp_path / "one", tiny_dir, *argv))
    run_ranks(_stage_rank, "dpo", dpo_argv(pairs, tmp_path / "two", tiny_dir, *argv, "--fsdp"))
    assert_same_run(tmp_path / "one", tmp_path / "two", "policy", ("model.safetensors",))


def test_bad_input_is_one_line_naming_the_flag_or_line(tiny_dir, pairs, tmp_path, capsys):
    def error(argv) -> str:
        try:
            code = train_cli.main(["dpo", *argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err
    assert "--beta must be > 0, got 0.0" in error(dpo_argv(pairs, tmp_path / "x", tiny_dir, "--beta", "0"))
    assert "--label-smoothing must be in [0, 0.5)" in error(dpo_argv(pairs, tmp_path / "x", tiny_dir,
                                                                     "--label-smoothing", "0.5"))
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    assert f"{bad}:1: missing field 'rejected'" in error(dpo_argv(bad, tmp_path / "y", tiny_dir))
    assert "--max-prompt-tokens 2 tokens" in error(dpo_argv(pairs, tmp_path / "z", tiny_dir,
                                                            "--max-prompt-tokens", "2"))
    # an SFT run is not a DPO run to resume, though both write policy/
    sft_run = tmp_path / "sft"
    model, tok = load_model(tiny_dir)
    save_model(model, tok, sft_run / "policy", extra_files={"run.json": json.dumps({"stage": "sft", "step": 1})})
    assert "written by stage 'sft', cannot resume it as 'dpo'" in error(dpo_argv(pairs, sft_run, tiny_dir, "--resume"))
