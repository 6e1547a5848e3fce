"""The training stages under torch.distributed (gloo, 2 spawned ranks with deadlines, tiny models in fp32):
one pm step, one sft step and one ppo iteration at world size 2 give the loss, metrics and updated weights
of world size 1 with the same global batch, with and without --fsdp; a run saved at world size 2 resumes
at world size 1 (and one saved at 1 resumes at 2) to the weights of an uninterrupted run. The ranks run
the same `main` a torchrun rank runs (tests/test_distributed.py spawns them)."""
import json
import zlib

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file
from test_distributed import one_thread, run_ranks
from test_pm import write_marker_pairs
from test_sft import write_sft_pairs

from models import save_model

LR = 1e-3
# Updated weights: AdamW moves a weight by lr * m / (sqrt(v) + eps), so a relative rounding error d in
# a gradient (different summation orders over 1 or 2 ranks) moves it by about lr * d. d is ~1e-6 for most
# weights, but a gradient whose terms nearly cancel keeps their rounding error, relative to a much smaller
# sum: one weight in 8192 of the tiny PPO run came out 1.03% of lr apart (AMD EPYC without AVX-512, AVX2
# kernels). Hence 5% of lr. A fault in the gradient's direction (a rank's part missing) changes most weights'
# updates by a good part of lr; one in its scale alone, which AdamW undoes, shows in the logged losses and
# gradient norms (METRIC_RTOL below). Only a gradient that is ~0 but
# for rounding has a noise sign, and lr times that sign is the whole update (the pm's head bias, whose
# gradient cancels in r_c - r_r, so pm runs add centering).
WEIGHT_ATOL = 0.05 * LR
# Losses and metrics: fp32 sums over the same rows in another order (relative), and after the first step
# of weights that differ by rounding; a difference of O(1) rewards (the pm's margin) is absolute.
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6


# --- the ranks ---------------------------------------------------------------------------------------------------
def _stage_rank(stage: str, argv: list[str]) -> None:
    """What `torchrun train.py STAGE ARGV` runs on each rank."""
    import train

    assert train.main([stage, *argv]) == 0


def one_process(stage: str, argv: list[str]) -> None:
    import train

    assert one_thread(train.main, [stage, *argv]) == 0


def read_log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


TIMING = ("step_s", "iter_s", "tokens_per_s", "save_s", "eval_s", "train_s", "seconds")


def logged(out) -> list[dict]:
    """The records two runs of the same schedule share, whatever stops and resumes they made: each step's
    (or iteration's) metrics and the last dev evaluation."""
    log = read_log(out)
    return [r for r in log if "grad_norm" in r] + [r for r in log if r.get("eval") == "dev"][-1:]


def assert_same_run(a, b, ckpt: str, files: tuple[str, ...]) -> None:
    """Runs a and b logged the same metrics (timings aside) and wrote the same weights."""
    la, lb = logged(a), logged(b)
    assert [sorted(r) for r in la] == [sorted(r) for r in lb] and la
    for ra, rb in zip(la, lb):
        for k, v in ra.items():
            if k in TIMING or k.startswith("t_") or not isinstance(v, float):
                continue
            assert rb[k] == pytest.approx(v, rel=METRIC_RTOL, abs=METRIC_ATOL), (ra.get("step"), k)
    for f in files:
        wa, wb = load_file(str(a / ckpt / f)), load_file(str(b / ckpt / f))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=WEIGHT_ATOL, rtol=0, msg=lambda m, f=f, k=k: f"{f}:{k}: {m}")


# --- data --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-train")
    tok = make_tiny_tokenizer()
    return {"model": save_model(make_tiny_model(0), tok, d / "tiny"),
            "pm_pairs": write_marker_pairs(d / "pm.jsonl", 40),
            "sft_pairs": write_sft_pairs(d / "sft.jsonl", 40)}


def pm_argv(data, out, *extra):
    # 2 steps of 8 pairs, 4 per rank in micro-batches of 2; dev scoring and the reward statistics run
    # across the ranks too.
    return ["--pairs", str(data["pm_pairs"]), "--out", str(out), "--model", str(data["model"]), "--no-progress",
            "--batch-size", "8", "--micro-batch", "2", "--max-steps", "2", "--lr", str(LR), "--warmup", "0",
            "--center-coef", "0.1", "--dev", "8", "--eval-every", "1", "--norm-samples", "4",
            "--norm-max-new-tokens", "4", *map(str, extra)]


def sft_argv(data, out, *extra):
    return ["--pairs", str(data["sft_pairs"]), "--out", str(out), "--model", str(data["model"]), "--no-progress",
            "--batch-size", "8", "--micro-batch", "2", "--max-steps", "2", "--lr", str(LR), "--warmup", "0",
            "--dev", "8", "--eval-every", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def pm_one(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pm") / "one"
    one_process("pm", pm_argv(data, out))
    return out


@pytest.fixture(scope="module")
def sft_one(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "one"
    one_process("sft", sft_argv(data, out))
    return out


# --- pm and sft --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicate", "fsdp"])
def test_pm_at_world_two_equals_world_one(data, pm_one, tmp_path, fsdp):
    out = tmp_path / "two"
    run_ranks(_stage_rank, "pm", pm_argv(data, out, *(["--fsdp"] if fsdp else [])))
    assert_same_run(pm_one, out, "reward", ("model.safetensors", "head.safetensors"))
    # The same files as one process writes, but the resume state in torch.distributed.checkpoint's format.
    assert (out / "reward" / "trainer_state").is_dir() and not (out / "reward" / "trainer_state.pt").exists()
    assert (pm_one / "reward" / "trainer_state.pt").is_file()
    # The reward statistics: 4 samples in one chunk, seeded as one process seeds them.
    a, b = (json.loads((d / "reward" / "run.json").read_text())["reward_norm"] for d in (pm_one, out))
    assert a["n"] == b["n"] == 4 and b["mean"] == pytest.approx(a["mean"], abs=1e-4)


def test_sft_at_world_two_equals_world_one(data, sft_one, tmp_path):
    out = tmp_path / "two"
    run_ranks(_stage_rank, "sft", sft_argv(data, out, "--fsdp"))
    assert_same_run(sft_one, out, "policy", ("model.safetensors",))
    assert [r["n"] for r in read_log(out) if r.get("eval") == "dev"] == [8, 8]


def test_resume_across_world_sizes(data, pm_one, sft_one, tmp_path):
    # pm: the first step at world size 2 (FSDP), the second at world size 1
    pm = tmp_path / "pm"
    run_ranks(_stage_rank, "pm", pm_argv(data, pm, "--fsdp", "--stop-after", "1"))
    one_process("pm", pm_argv(data, pm, "--resume"))
    assert_same_run(pm_one, pm, "reward", ("model.safetensors", "head.safetensors"))
    # sft: the first step in one process (trainer_state.pt), the second at world size 2
    sft = tmp_path / "sft"
    one_process("sft", sft_argv(data, sft, "--stop-after", "1"))
    run_ranks(_stage_rank, "sft", sft_argv(data, sft, "--resume"))
    assert_same_run(sft_one, sft, "policy", ("model.safetensors",))


# --- ppo ---------------------------------------------------------------------------------------------------------
def rowwise_generate(model, prompts, params, stop_ids, pad_id, generator=None, **kw):
    """models.generation.generate, one prompt at a time, each seeded by its tokens and the iteration's seed:
    rollouts that do not depend on which rank samples them or beside which rows. (The lock-step batch
    draws every row's tokens from one stream, so N ranks sample other responses than one process, as
    likely but not the same; PPO's update on given rollouts is what must not depend on N.)"""
    from models.generation import Generation, generate
    from rlcd import distributed

    seed = (generator.initial_seed() - distributed.rank()) // distributed.world_size()   # the iteration's
    gens = []
    for p in prompts:
        g = torch.Generator(model.device).manual_seed(seed + zlib.crc32(str(p).encode()))
        gens.append(generate(model, [p], params, stop_ids, pad_id, generator=g, **kw))
    T_p, T_n = max(x.prompt_len for x in gens), max(x.tokens.shape[1] for x in gens)
    seq = torch.full((len(gens), T_p + T_n), pad_id, dtype=torch.long)                     # (B, T)
    tokens = torch.full((len(gens), T_n), pad_id, dtype=torch.long)                        # (B, T_r)
    logprobs = torch.zeros(len(gens), T_n)                                                 # (B, T_r)
    for b, x in enumerate(gens):
        n = x.tokens.shape[1]
        seq[b, T_p - x.prompt_len:T_p + n] = x.sequences[0]        # left-padded prompt, then the response
        tokens[b, :n] = x.tokens[0]
        if x.logprobs is not None:
            logprobs[b, :n] = x.logprobs[0]
    return Generation(sequences=seq, start=torch.tensor([T_p - x.prompt_len for x in gens]), prompt_len=T_p,
                      tokens=tokens, lengths=torch.cat([x.lengths for x in gens]),
                      finished=torch.cat([x.finished for x in gens]),
                      logprobs=logprobs if gens[0].logprobs is not None else None)


def _ppo_rank(argv: list[str]) -> None:
    import rlcd.ppo

    rlcd.ppo.generate = rowwise_generate
    _stage_rank("ppo", argv)


@pytest.fixture(scope="module")
def ppo_setup(data, tmp_path_factory):
    from test_ppo import save_pm, write_prompt_file

    d = tmp_path_factory.mktemp("ppo")
    return data["model"], save_pm(make_tiny_model(1), make_tiny_tokenizer(), d / "pm"), write_prompt_file(d / "p.txt")


def ppo_argv(setup, out, *extra):
    # 2 iterations of 8 rollouts (4 per rank), an adaptive KL coefficient (its update uses the global KL).
    # --no-stop-score -1 (every 6-token rollout is cut off, so every score is -1): with the PM's own scores
    # one weight of the first block gets a gradient that is zero but for rounding, whose sign then differs
    # between 1 and 2 ranks under SSE4.2 kernels, and AdamW's first step moves it by lr times that sign
    # (see WEIGHT_ATOL). --whiten-rewards keeps the regime it was written for: without it every return is
    # exactly -1, the advantages are the value head's tiny spread whitened to unit variance, and the policy
    # loss (zero but for rounding) differs between 1 and 2 ranks by more than its tolerance. One epoch of one
    # minibatch with one learning rate: with several minibatches each world size shuffles its own rollouts
    # into them, so the runs are equal in distribution only.
    policy, pm, prompts = setup
    return ["--policy", str(policy), "--pm", str(pm), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "8", "--max-new-tokens", "6", "--iterations", "2", "--lr", str(LR), "--warmup", "0",
            "--kl-target", "1.0", "--sample-every", "0", "--no-stop-score", "-1", "--whiten-rewards",
            "--ppo-epochs", "1", "--minibatches", "1", "--value-lr", "none", *map(str, extra)]


# (value network, micro-batch, sharding): the default path (old log-probs and values from the update's
# forward: one micro-batch per rank, 8 >= 4) and the general one (values at rollout, 2 micro-batches).
@pytest.mark.parametrize("value_model,micro_batch,fsdp", [("separate", 8, True), ("shared", 2, False)],
                         ids=["separate-fused-fsdp", "shared-general-replicate"])
def test_ppo_at_world_two_equals_world_one(ppo_setup, tmp_path, monkeypatch, value_model, micro_batch, fsdp):
    from rlcd import ppo as ppo_mod

    extra = ["--value-model", value_model, "--micro-batch", micro_batch, *(["--fsdp"] if fsdp else [])]
    monkeypatch.setattr(ppo_mod, "generate", rowwise_generate)
    one_process("ppo", ppo_argv(ppo_setup, tmp_path / "one", *extra))
    run_ranks(_ppo_rank, ppo_argv(ppo_setup, tmp_path / "two", *extra))
    value = "value.safetensors" if value_model == "separate" else "value_head.safetensors"
    assert_same_run(tmp_path / "one", tmp_path / "two", "policy", ("model.safetensors", value))
    beta = [[r["beta"] for r in read_log(tmp_path / d) if "beta" in r] for d in ("one", "two")]
    assert beta[0][1] != beta[0][0] and beta[1] == pytest.approx(beta[0], rel=1e-6)   # the controller moved alike
    meta = [json.loads((tmp_path / d / "policy" / "run.json").read_text())["kl_ctl"] for d in ("one", "two")]
    assert meta[1]["value"] == pytest.approx(meta[0]["value"], rel=1e-6)


def test_pipeline_and_ablate_refuse_to_run_under_torchrun(monkeypatch, capsys):
    import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    for job in ("pipeline", "ablate"):
        assert train.main([job, "--task", "harmless", "--out", "unused"]) == 2
        assert f"train.py {job}: not under torchrun" in capsys.readouterr().err
