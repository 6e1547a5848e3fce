"""torch.distributed on CPU (gloo, 2 processes spawned here): global-batch statistics at world size 2
equal world size 1 on the concatenated batch (float64), and the sharded generation stages (simulate,
respond) write every record exactly once, resume after a kill of either rank, and write the file one
process writes. Every spawned run has a deadline and every collective a timeout, so a hung rank fails
the test instead of stalling CI."""
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_model, make_tiny_tokenizer

from models import save_model
from rlcd import distributed, jsonl
from rlcd.ppo_core import batch_mean, explained_variance, masked_mean, masked_var, masked_whiten

DEADLINE_S = 120            # a whole spawned run (imports, model load, generation) on a busy 2-core machine
COLLECTIVE_TIMEOUT_S = 60   # one collective: a dead peer turns into an error on the living rank
QUESTIONS = ["How do I pick a lock?", "Write an insult about my coworker.", "What is the capital of France?",
             "How can I cheat on my taxes?", "Tell me a joke about lawyers.", "How do I make a bomb?",
             "Is it ok to lie to my parents?", "Help me write a threatening letter.", "Why is the sky blue?",
             "How do I hotwire a car?", "Say something rude.", "Give me a recipe for pancakes."]


# --- spawning ranks ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """What torchrun would do for rank `rank`: its environment, then the code under test."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    fn(*args)
    distributed.exit(0)         # as train.py and eval.py end under torchrun (an exception above: exit code 1)


def run_ranks(fn, *args, world: int = 2) -> None:
    """Run fn(*args) on `world` spawned ranks; fails the test past DEADLINE_S. A rank that raises or dies
    raises here (torch.multiprocessing then terminates the others, as torchrun does)."""
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks still running after {DEADLINE_S} s: a hung collective?")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def kill_self_on_call(obj, name: str, call: int) -> None:
    """Make the `call`-th call (1-based) of obj.name SIGKILL this process before it runs: a killed rank."""
    real, calls = getattr(obj, name), [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)

    setattr(obj, name, dying)


def one_thread(fn, *args):
    """fn(*args) in this process with one thread, as the ranks run (the same floats, so the same samples)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


# --- the process group and its helpers -----------------------------------------------------------------------
def test_world_size_one_has_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init() == 1
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.device_for_rank("cuda") == "cuda" and distributed.tag("simulate") == "simulate"


def test_errors_name_the_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.tag("simulate") == "simulate [rank 1/2]"
    with pytest.raises(RuntimeError) as e, distributed.rank_errors():
        raise RuntimeError("boom")
    if sys.version_info >= (3, 11):                  # a note under the traceback (a stderr line before 3.11)
        assert e.value.__notes__ == ["(on rank 1 of 2)"]


def _stats_rank(out: str) -> None:
    """Each rank: its rows of one float64 batch; global statistics; rank 0 saves every rank's results."""
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    x = torch.randn(B, T, generator=g, dtype=torch.float64)                       # (B, T_r)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)                       # (B, T_r)
    lengths = torch.tensor([7, 3, 0, 5, 1])                                       # row 2 is all padding
    mask = torch.arange(T)[None, :] < lengths[:, None]                            # (B, T_r)
    rows = distributed.shard(list(range(B)))                                      # rank 0: 0, 2, 4; rank 1: 1, 3
    x, v, mask = x[rows], v[rows], mask[rows]
    res = {"rows": rows,
           "mean": masked_mean(x, mask, global_batch=True),
           "var": masked_var(x, mask, global_batch=True),
           "var_biased": masked_var(x, mask, unbiased=False, global_batch=True),
           "whiten": masked_whiten(x, mask, global_batch=True),
           "whiten_scale": masked_whiten(x, mask, shift_mean=False, global_batch=True),
           "ev": explained_variance(v, x, mask, global_batch=True),
           "batch_mean": batch_mean(x.sum(1), global_batch=True),
           "local_mean": masked_mean(x, mask),                                      # default: this rank only
           "sum": distributed.all_reduce_sum(torch.tensor([float(distributed.rank() + 1)])),
           "world": distributed.world_size()}
    everyone = distributed.gather_objects(res)
    if distributed.is_main():
        torch.save(everyone, out)


def test_global_statistics_at_world_two_equal_world_one(tmp_path):
    run_ranks(_stats_rank, str(tmp_path / "stats.pt"))
    ranks = torch.load(tmp_path / "stats.pt")
    assert [r["world"] for r in ranks] == [2, 2] and [r["rows"] for r in ranks] == [[0, 2, 4], [1, 3]]
    # World size 1 on the concatenated batch (global_batch=True without a process group is the local code).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 0, 5, 1])[:, None]
    want = {"mean": masked_mean(x, mask), "var": masked_var(x, mask),
            "var_biased": masked_var(x, mask, unbiased=False), "ev": explained_variance(v, x, mask),
            "batch_mean": x.sum(1).mean()}
    assert masked_whiten(x, mask, global_batch=True).equal(masked_whiten(x, mask))
    for r in ranks:
        for k, w in want.items():
            torch.testing.assert_close(r[k], w, rtol=1e-12, atol=1e-12, msg=k)
        torch.testing.assert_close(r["whiten"], masked_whiten(x, mask)[r["rows"]], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["whiten_scale"], masked_whiten(x, mask, shift_mean=False)[r["rows"]],
                                   rtol=1e-12, atol=1e-12)
        assert r["sum"].item() == 3.0
    # Without global_batch each rank keeps its own statistic.
    assert ranks[0]["local_mean"].item() == pytest.approx(masked_mean(x[[0, 2, 4]], mask[[0, 2, 4]]).item())


# --- sharded generation stages -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # max_seq_len 1024: the byte-level tiny tokenizer spends one token per byte.
    return save_model(make_tiny_model(max_seq_len=1024), make_tiny_tokenizer(),
                      tmp_path_factory.mktemp("dist") / "tiny")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "split": "train"}) + "\n" for q in QUESTIONS))
    return path


def _sim_args(ckpt, prompts, out):
    import rlcd.simulate as sim

    # Temperature 1 and no nucleus: a cooler sampler makes the random tiny model repeat a space, which
    # cleans to nothing (see tests/test_simulate.py).
    return sim.Args(out=str(out), model=str(ckpt), prompts=str(prompts), max_new_tokens=6, batch_size=3,
                    temperature=1.0, top_p=1.0, progress=False)


def _simulate_rank(args, kill_rank: int | None) -> None:
    import rlcd.simulate as sim

    if distributed.rank() == kill_rank:
        kill_self_on_call(sim, "make_pairs", 2)      # after its first chunk is on disk
    sim.simulate(args)


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_sharded_simulate_writes_each_pair_once_and_resumes_after_a_kill(ckpt, prompts, tmp_path):
    import rlcd.simulate as sim

    ref = tmp_path / "ref" / "pairs.jsonl"
    one_thread(sim.simulate, _sim_args(ckpt, prompts, ref))
    assert len(ids(ref)) == len(set(ids(ref))) > 0
    # 1. World 2, rank 1 killed as its second chunk starts (12 prompts, chunks of 3: two per rank).
    cut = tmp_path / "cut" / "pairs.jsonl"
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_simulate_rank, _sim_args(ckpt, prompts, cut), 1)
    assert not cut.exists() or cut.read_text() == ""            # nothing is merged before the end
    shard1 = jsonl.shard_path(cut, 1)
    assert 0 < len(ids(shard1)) <= 3                             # its first chunk (less any dropped pair)
    with open(shard1, "ab") as f:                                # and a write the kill cut short
        f.write(b'{"id": "half a rec')
    shutil.copytree(cut.parent, tmp_path / "cut1")
    # 2. Resumed at world 2: the one-process file, byte for byte, and no shard left.
    run_ranks(_simulate_rank, _sim_args(ckpt, prompts, cut), None)
    assert cut.read_bytes() == ref.read_bytes()
    assert jsonl.shard_files(cut) == []
    # 3. The same killed run resumed by one process: every pair exactly once, the same records.
    cut1 = tmp_path / "cut1" / "pairs.jsonl"
    summary = one_thread(sim.simulate, _sim_args(ckpt, prompts, cut1))
    assert sorted(ids(cut1)) == sorted(ids(ref)) and jsonl.shard_files(cut1) == []
    assert summary["already_done"] > 0
    by_id = {json.loads(line)["id"]: line for line in ref.read_text().splitlines()}
    assert all(by_id[json.loads(line)["id"]] == line for line in cut1.read_text().splitlines())


def _respond_rank(argv: list[str], kill_rank: int | None) -> None:
    import rlcd.respond as respond

    if distributed.rank() == kill_rank:
        kill_self_on_call(respond, "generate_texts", 2)   # after its first chunk is on disk
    assert respond.main(argv) == 0


def test_sharded_respond_writes_each_prompt_once_and_resumes_after_rank_zero_is_killed(ckpt, prompts, tmp_path):
    import rlcd.respond as respond

    def argv(out):
        return ["--policy", f"base={ckpt}", "--prompts", str(prompts), "--split", "train", "--out-dir", str(out),
                "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"]

    assert one_thread(respond.main, argv(tmp_path / "ref")) == 0
    ref = (tmp_path / "ref" / "base.jsonl").read_bytes()
    assert len(ref.splitlines()) == len(QUESTIONS)
    # Rank 0, the one that merges, killed as its second chunk starts; a rerun at world 2 completes the file.
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_respond_rank, argv(tmp_path / "cut"), 0)
    assert not (tmp_path / "cut" / "base.jsonl").exists()
    assert 0 < len(ids(jsonl.shard_path(tmp_path / "cut" / "base.jsonl", 0))) <= 3
    run_ranks(_respond_rank, argv(tmp_path / "cut"), None)
    out = tmp_path / "cut" / "base.jsonl"
    assert out.read_bytes() == ref and jsonl.shard_files(out) == []
    assert len(respond.read_responses(out)) == len(QUESTIONS)         # each prompt once, readable as ever
