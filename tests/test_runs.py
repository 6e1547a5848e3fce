"""The shared training plumbing: schedule, data order, dev split, freezing, optimiser groups, RNG state,
atomic checkpoints, the NaN guard, and run-directory checks."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from models import CheckpointError, load_model
from rlcd import checkpoints, runs


def test_cosine_schedule_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = runs.cosine_schedule(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]   # 4 post-warm-up steps
    assert lrs == pytest.approx([1.0, 2.0] + [2.0 * c for c in cos])
    assert lrs[2] == pytest.approx(2.0) and lrs[-1] > 0.2               # peak after warm-up, never below min


def test_batch_indices_are_epoch_permutations_and_a_pure_function():
    n, B = 10, 4
    stream = [i for s in range(5) for i in runs.batch_indices(n, B, s, seed=3)]   # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]                                   # a fresh order each epoch
    assert runs.batch_indices(n, B, 2, seed=3) == stream[8:12]          # step 2 straddles the epochs
    assert runs.batch_indices(n, B, 0, seed=4) != runs.batch_indices(n, B, 0, seed=3)


def test_split_dev_groups_prompts_and_is_file_independent():
    keys = [f"p{i // 2}" for i in range(40)]                            # two pairs per prompt
    train, dev = runs.split_dev(keys, 0.25, seed=0)
    assert len(dev) == 10 and sorted(train + dev) == list(range(40))
    assert not {keys[i] for i in train} & {keys[i] for i in dev}        # no prompt on both sides
    # another file over the same prompts (different order, one pair each) gets the same dev prompts
    other = [f"p{i}" for i in reversed(range(20))]
    _, dev2 = runs.split_dev(other, 5, seed=0)
    assert {other[i] for i in dev2} == {keys[i] for i in dev}
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        runs.split_dev(keys, 20, seed=0)


def test_freeze_lower_layers_and_optimizer_groups():
    model = make_tiny_model(n_layers=3)
    runs.freeze_lower_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("layers.2.") or n == "norm.weight"}
    args = runs.TrainArgs(out="x", weight_decay=0.1)
    opt = runs.make_optimizer(list(model.named_parameters()), args, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    with pytest.raises(ValueError, match="exceeds the model's 3 blocks"):
        runs.freeze_lower_layers(model, 4)


def test_rng_state_round_trip():
    state = checkpoints.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoints.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def _checkpoint(tmp_path, step, scale=1.0):
    torch.manual_seed(step)
    model = make_tiny_model()
    with torch.no_grad():
        model.norm.weight.fill_(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = runs.cosine_schedule(opt, 1, 10)
    ckpt = tmp_path / "run" / "policy"
    ckpt.parent.mkdir(exist_ok=True)
    return checkpoints.save_checkpoint(ckpt, model, make_tiny_tokenizer(), {"stage": "sft"}, opt, sched, step, "fp",
                                       {"head": {"weight": torch.full((1, 4), scale)}})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, step=2, scale=2.0)
    assert checkpoints.read_run_meta(ckpt)["step"] == 2

    def crash(*a, **k):                        # the process dies while writing the trainer state
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(checkpoints.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(tmp_path, step=4, scale=4.0)
    monkeypatch.undo()
    # the previous checkpoint is complete and unchanged; nothing half-written is left beside it
    assert checkpoints.read_run_meta(ckpt)["step"] == 2
    model, _ = load_model(ckpt)
    assert torch.all(model.norm.weight == 2.0)
    assert sorted(os.listdir(ckpt.parent)) == ["policy"]
    # a full disk (torch.save's own words for it) is reported with the checkpoint's path and the free space
    def disk_full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 54912 vs 54804")
    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"writing checkpoint .*policy failed with [0-9.]+ GiB free .* is intact "
                                      r"\(RuntimeError: .*unexpected pos"):
        _checkpoint(tmp_path, step=5, scale=5.0)
    monkeypatch.undo()
    assert checkpoints.read_run_meta(ckpt)["step"] == 2 and sorted(os.listdir(ckpt.parent)) == ["policy"]
    # a crash between the two renames of the swap leaves only .policy.old: it is found and restored
    os.replace(ckpt, ckpt.with_name(".policy.old"))
    found, meta = checkpoints.find_checkpoint(ckpt.parent, "sft")
    assert found == ckpt and meta["step"] == 2 and torch.equal(load_model(ckpt)[0].norm.weight, model.norm.weight)


def test_trainer_state_round_trip_and_data_check(tmp_path):
    ckpt = _checkpoint(tmp_path, step=3)
    model = make_tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = runs.cosine_schedule(opt, 1, 10)
    assert checkpoints.load_trainer_state(ckpt, opt, sched, "fp") == 3
    with pytest.raises(CheckpointError, match="training data or its order changed"):
        checkpoints.load_trainer_state(ckpt, opt, sched, "other")


def test_nan_guard_names_the_quantity_and_skips_the_update(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 7: non-finite grad_norm=inf"):
        runs.check_finite(7, loss=1.0, grad_norm=float("inf"))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = runs.cosine_schedule(opt, 0, 4)
    args = runs.TrainArgs(out=str(tmp_path), batch_size=2, micro_batch=2, progress=False)

    def loss_fn(micro, batch):
        return (w * float("nan")).sum(), {}, 1
    with pytest.raises(FloatingPointError, match="step 1: non-finite loss=nan"):
        runs.train_loop(args, [w], opt, sched, 4, [1] * 4, 0, 4, torch.device("cpu"), loss_fn, dict,
                        lambda s: None, tmp_path / "m.jsonl", "t")
    assert torch.equal(w.detach(), torch.ones(3))


def test_train_loop_accumulates_logs_and_saves(tmp_path):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = runs.cosine_schedule(opt, 0, 3)
    args = runs.TrainArgs(out=str(tmp_path), batch_size=4, micro_batch=2, progress=False, eval_every=2, save_every=2,
                          grad_clip=0.0)
    x = torch.arange(8.0).reshape(4, 2)
    seen, saved = [], []

    def loss_fn(micro, batch):                 # mean over the batch of 0.5 |w - x_i|^2, split in two
        seen.append(list(micro))
        loss = sum(0.5 * ((w - x[i]) ** 2).sum() for i in micro) / len(batch)
        return loss, {"n_micro": torch.tensor(1.0)}, 10 * len(micro)
    summary = runs.train_loop(args, [w], opt, sched, 4, [4, 3, 2, 1], 0, 3, torch.device("cpu"), loss_fn,
                              lambda: {"score": 1.0}, saved.append, tmp_path / "m.jsonl", "t")
    assert all(len(m) == 2 for m in seen) and len(seen) == 6
    assert all(seen[i] + seen[i + 1] == [3, 2, 1, 0] for i in (0, 2, 4))   # sorted by length within a step
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "lr" in r]
    assert [r["n_micro"] for r in steps] == [2.0] * 3 and [r["tokens"] for r in steps] == [40] * 3
    # the two micro-batches sum to the batch mean of the per-example losses, at w = 0
    assert steps[0]["loss"] == pytest.approx(np.mean([0.5 * (a * a + b * b) for a, b in x.tolist()]))
    assert [r["step"] for r in recs if r.get("eval")] == [2, 3] and saved == [2, 3]
    assert summary["step"] == 3 and summary["dev_score"] == 1.0 and summary["train_tokens"] == 120


def test_prepare_run_writes_args_not_a_model_config(tmp_path):
    args = runs.TrainArgs(out=str(tmp_path / "run"))
    assert runs.prepare_run(args, "sft") is None
    assert json.loads((tmp_path / "run" / "args.json").read_text())["lr"] == args.lr
    assert not (tmp_path / "run" / "config.json").exists()     # would make OUT look like a model directory


def test_resume_checks_settings_and_drops_metrics_after_the_checkpoint(tmp_path):
    args = runs.TrainArgs(out=str(tmp_path / "run"), lr=1e-3)
    runs.prepare_run(args, "sft")
    model = make_tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    checkpoints.save_checkpoint(tmp_path / "run" / "policy", model, make_tiny_tokenizer(),
                                checkpoints.run_meta("sft", args, 9), opt, runs.cosine_schedule(opt, 0, 9), 2, "fp")
    for s in (1, 2, 3, 4):                    # steps 3 and 4 were logged, then the run died before saving
        runs.log_jsonl(tmp_path / "run" / runs.METRICS, {"step": s, "loss": 1.0})
    resumed = runs.TrainArgs(out=str(tmp_path / "run"), lr=1e-3, resume=True, stop_after=5, progress=False)
    assert runs.prepare_run(resumed, "sft") == tmp_path / "run" / "policy"
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / runs.METRICS).read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(CheckpointError, match=r"different settings \(lr: 0.001 -> 0.002\)"):
        runs.prepare_run(runs.TrainArgs(out=str(tmp_path / "run"), lr=2e-3, resume=True), "sft")
    with pytest.raises(CheckpointError, match="cannot resume it as 'ppo'|not a 'ppo'"):
        runs.prepare_run(runs.TrainArgs(out=str(tmp_path / "run"), lr=1e-3, resume=True), "ppo")


def test_precision_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    from rlcd import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, fp32, bf16 = (runs.TrainArgs(out="x", precision=p) for p in ("auto", "fp32", "bf16"))
    assert runs.precision_of(auto, cuda).bf16 and not runs.precision_of(fp32, cuda).bf16
    # the suite declares no native bf16 (RLCD_CPU_BF16=0, conftest): auto is the fp32 reference
    assert not runs.precision_of(auto, cpu).bf16 and "RLCD_CPU_BF16=0" in runs.precision_of(auto, cpu).reason
    # bf16 asked by name runs as asked; on a CPU without native bf16 its record says it is emulated
    assert runs.precision_of(bf16, cpu).describe() == "bf16 (bf16: emulated: no native bf16 on this CPU, slower than fp32)"
    assert runs.precision_of(bf16, cuda).describe() == "bf16" and runs.precision_of(fp32, cpu).describe() == "fp32"
    monkeypatch.setenv("RLCD_CPU_BF16", "1")
    precision.cpu_flags.cache_clear()                                # read once per process: read the fake
    monkeypatch.setattr("builtins.open", _fake_cpuinfo("fpu sse avx512f avx512_bf16 amx_tile"))
    got = runs.precision_of(auto, cpu)
    assert got.bf16 and got.describe() == "bf16 (auto: the CPU has avx512_bf16)"
    assert runs.precision_of(bf16, cpu).describe() == "bf16"                    # native: nothing to say
    precision.cpu_flags.cache_clear()
    monkeypatch.setattr("builtins.open", _fake_cpuinfo("fpu sse avx2 avx512f"))
    assert not runs.precision_of(auto, cpu).bf16 and precision.native_bf16_cpu() is None
    monkeypatch.undo()
    precision.cpu_flags.cache_clear()
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'bfloat16'"):
        precision.resolve("bfloat16")
    model = make_tiny_model()
    with runs.autocast(bf16, cpu):
        assert torch.is_autocast_enabled("cpu")
        assert model(torch.tensor([[5, 6, 7]])).dtype == torch.bfloat16          # the head ran in bf16
    with runs.autocast(fp32, cpu):
        assert not torch.is_autocast_enabled("cpu")


def _fake_cpuinfo(flags: str):
    import io
    real = open

    def fake(path, *a, **k):
        return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n") if path == "/proc/cpuinfo" else real(path, *a, **k)
    return fake
