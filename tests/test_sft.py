"""Supervised fine-tuning (context distillation): the loss covers response tokens only, the stage runs
end to end into a policy that generate.py loads, resume and micro-batching do not change the result."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

import generate as generate_cli
from models import CheckpointError, load_model, save_model
from rlcd import checkpoints
from rlcd import sft as sft_mod
from rlcd.pairs import PairsError
from rlcd.sft import encode_example, read_examples, response_mask, sft_nll


def test_response_mask_by_hand():
    # row 0: prompt 2 tokens, 5 in all -> positions 1, 2, 3 predict the 3 response tokens
    # row 1: prompt 3, 4 in all (then padding) -> position 2 predicts the 1 response token
    m = response_mask(torch.tensor([2, 3]), torch.tensor([5, 4]), T=6)
    assert m.tolist() == [[False, True, True, True, False], [False, False, True, False, False]]


def test_sft_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    model = make_tiny_model()
    tokens = torch.randint(3, 300, (2, 9))
    prompt_len, seq_len = torch.tensor([4, 2]), torch.tensor([9, 6])
    h = model(tokens, return_hidden=True).detach().requires_grad_()           # (2, 9, D)
    nll, n = sft_nll(h, model.output_weight, tokens, prompt_len, seq_len)
    # reference: full logits, cross-entropy on the response targets only, in float64
    logits = (h.double() @ model.output_weight.double().T)[:, :-1]           # (2, 8, V)
    targets = tokens[:, 1:].clone()
    for b in range(2):
        targets[b, :prompt_len[b] - 1] = -100                                   # prompt targets
        targets[b, seq_len[b] - 1:] = -100                                      # padding targets
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="sum")
    assert n.item() == (9 - 4) + (6 - 2)
    assert nll.item() == pytest.approx(ref.item(), rel=1e-5)
    nll.backward()
    g = h.grad.abs().sum(-1)                                                   # (2, 9)
    for b in range(2):
        p, s = prompt_len[b].item(), seq_len[b].item()
        assert torch.all(g[b, :p - 1] == 0) and torch.all(g[b, s - 1:] == 0)  # no gradient from prompt or pad
        assert torch.all(g[b, p - 1:s - 1] > 0)


def test_encode_example_appends_the_stop_token_and_truncates_right():
    tok = make_tiny_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids, p = encode_example(tok, prompt, "yo", "chat", 512)
    assert ids == tok.encode(prompt) + tok.encode("yo") + [2] and p == len(tok.encode(prompt))
    assert encode_example(tok, prompt, "yo", "chat", p + 1) == (ids[:p + 1], p)
    assert encode_example(tok, prompt, "yo", "chat", p) is None      # no room for a response token


# --- the stage end to end -----------------------------------------------------------------------------------
def write_sft_pairs(path, n, seed=0):
    """Responses that copy the user's word reversed: learnable by a tiny model within a few steps."""
    tok, rng = make_tiny_tokenizer(), random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            w = "".join(rng.choice("abcd") for _ in range(5))
            f.write(json.dumps({"id": f"p{i}", "prompt": tok.apply_chat_template([{"role": "user", "content": w}]),
                                "chosen": w[::-1], "rejected": w, "label": 1.0, "format": "chat"}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_model(make_tiny_model(), make_tiny_tokenizer(), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_sft_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 96)


def sft_argv(pairs, out, model, *extra):
    return ["--pairs", str(pairs), "--out", str(out), "--model", str(model), "--no-progress", "--save-every", "1000",
            "--eval-every", "0", "--batch-size", "8", "--micro-batch", "4", *map(str, extra)]


def test_sft_trains_a_policy_that_generate_loads(tiny_dir, pairs, tmp_path, capsys):
    out = tmp_path / "sft"
    assert sft_mod.main(sft_argv(pairs, out, tiny_dir, "--lr", "3e-3", "--max-steps", "30", "--warmup", "3")) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x and "eval" not in x and not x.get("summary")]
    dev = [x for x in lines if x.get("eval") == "dev"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert dev[-1]["n"] == 10 and dev[-1]["ppl"] > 1
    meta = json.loads((out / "policy" / "run.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 30
    load_model(out)                                # a run directory resolves to its policy/
    capsys.readouterr()
    assert generate_cli.main(["--model", str(out), "--prompt", "abcd", "--max-new-tokens", "3"]) in (0, None)
    assert capsys.readouterr().out.strip() != ""


def test_sft_resume_and_micro_batching_do_not_change_the_result(tiny_dir, pairs, tmp_path):
    common = ("--lr", "3e-3", "--max-steps", "4", "--warmup", "1")
    assert sft_mod.main(sft_argv(pairs, tmp_path / "a", tiny_dir, *common)) == 0
    assert sft_mod.main(sft_argv(pairs, tmp_path / "b", tiny_dir, *common, "--stop-after", "2")) == 0
    assert sft_mod.main(sft_argv(pairs, tmp_path / "b", tiny_dir, *common, "--resume")) == 0
    a = load_file(str(tmp_path / "a" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # micro-batch 8 instead of 4: the loss is a per-token mean over the whole batch either way
    assert sft_mod.main(sft_argv(pairs, tmp_path / "c", tiny_dir, *common, "--micro-batch", "8")) == 0
    c = load_file(str(tmp_path / "c" / "policy" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=1e-4)


def test_sft_bad_input(tiny_dir, pairs, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(PairsError, match=r"bad\.jsonl:1: missing string field 'chosen'"):
        read_examples([str(f)], "chosen")
    f.write_text("")
    assert sft_mod.main(sft_argv(f, tmp_path / "x", tiny_dir)) == 2
    assert "no examples (empty file)" in capsys.readouterr().err
    # a preference-model run directory is not an SFT run to resume
    pm_run = tmp_path / "pm"
    model, tok = load_model(tiny_dir)
    save_model(model, tok, pm_run / "reward", extra_files={"run.json": json.dumps({"stage": "pm", "step": 1})})
    assert sft_mod.main(sft_argv(pairs, pm_run, tiny_dir, "--resume")) == 2
    assert "holds a 'pm' run (reward/), not a 'sft' run" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="a 'pm' run directory"):
        checkpoints.find_checkpoint(pm_run, "sft")
