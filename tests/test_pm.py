"""The Bradley-Terry preference model: loss math, last-token pooling, learning, freezing, resume,
scoring, pm-agreement, and clear errors on bad input. Tiny models in fp32, loss math in float64."""
import json
import math
import random

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import NET_TOL
from safetensors.torch import load_file

import eval as eval_cli
from models import CheckpointError, load_model, save_model
from models.generation import left_pad
from rlcd import pm as pm_mod
from rlcd import runs
from rlcd.pairs import PairsError, length_balanced, read_pairs
from rlcd.pm import bt_loss, disentangle_loss, pair_metrics
from rlcd.reward import (RewardModel, encode_input, end_marker, load_reward_model, score_ids, score_texts,
                         score_tokens)


# --- the loss ----------------------------------------------------------------------------------------------
def f64(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_bt_loss_hard_labels_by_hand():
    # mean(softplus(-(1 - 0)), softplus(-(0 - 2))) = (log(1 + e^-1) + log(1 + e^2)) / 2
    loss = bt_loss(f64(1.0, 0.0), f64(0.0, 2.0), 1.0)
    assert loss.item() == pytest.approx(1.2200948492805979, abs=1e-12)


def test_bt_loss_soft_label_by_hand_and_its_gradient():
    r_c = f64(2.0).requires_grad_()
    # -(0.7 log sigma(2) + 0.3 log sigma(-2)) = 0.7 log(1 + e^-2) + 0.3 log(1 + e^2)
    loss = bt_loss(r_c, f64(0.0), f64(0.7))
    assert loss.item() == pytest.approx(0.7269280110429726, abs=1e-12)
    loss.backward()
    assert r_c.grad.item() == pytest.approx(1 / (1 + math.exp(-2)) - 0.7, abs=1e-12)   # sigma(d) - y


def test_bt_loss_margin_and_centering_by_hand():
    assert bt_loss(f64(1.0), f64(0.0), 1.0, margin=1.0).item() == pytest.approx(math.log(2), abs=1e-12)
    # log(1 + e^-0.5) + 0.1 * (1 + 0.5)^2
    assert bt_loss(f64(1.0), f64(0.5), 1.0, center_coef=0.1).item() == pytest.approx(0.6990769841801067, abs=1e-12)
    # both off by default: the centering term would change this value
    assert bt_loss(f64(3.0), f64(1.0), 1.0).item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-12)


def test_disentangle_loss_by_hand_and_its_gradient():
    n = f64(1.0, 2.0, 3.0)
    # reward falling with length (|corr| 1), length head rising with it (corr 1), orthogonal heads: 1 - 1 + 0
    assert disentangle_loss(f64(3.0, 2.0, 1.0), f64(1.0, 2.0, 3.0), n, f64(1.0, 0.0), f64(0.0, 1.0)).item() == \
        pytest.approx(0.0, abs=1e-12)
    # a constant reward has no correlation (0, not NaN); r_len (3, 1, 2) against n: corr -1/2; cos 1/sqrt(2)
    v = disentangle_loss(f64(1.0, 1.0, 1.0), f64(3.0, 1.0, 2.0), n, f64(1.0, 1.0), f64(1.0, 0.0)).item()
    assert v == pytest.approx(0.5 + 1 / math.sqrt(2), abs=1e-12)
    # the gradient, against central differences in float64
    g = torch.Generator().manual_seed(0)
    r, r_len = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    w, w_len = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    n6 = torch.tensor([3, 9, 4, 12, 7, 5])
    assert torch.autograd.gradcheck(lambda *x: disentangle_loss(x[0], x[1], n6, x[2], x[3]),
                                    tuple(t.requires_grad_() for t in (r, r_len, w, w_len)))


def test_pair_metrics_soft_labels_and_ties():
    m = pair_metrics(f64(1.0, 0.0, 0.0, 2.0), f64(0.0, 1.0, 1.0, 2.0), f64(1.0, 0.2, 0.9, 0.5))
    # right, right (label says rejected is better and it is), wrong, tie label counts half
    assert m["accuracy"].item() == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    s = 1 / (1 + math.exp(-1))
    assert m["p_chosen"].item() == pytest.approx((s + (1 - s) + (1 - s) + 0.5) / 4)
    assert m["margin"].item() == pytest.approx((1 - 1 - 1 + 0) / 4)


def test_head_init():
    pm = RewardModel(make_tiny_model(dim=512, n_layers=1, hidden_dim=64, n_heads=8, n_kv_heads=4))
    w = pm.head.weight.detach().double()
    assert w.shape == (1, 512)
    assert w.std().item() == pytest.approx(1 / math.sqrt(513), rel=0.15)
    assert torch.count_nonzero(pm.head.bias) == 0


# --- pooling at the last real token ----------------------------------------------------------------------
def test_last_token_pooling_left_and_right_padding():
    torch.manual_seed(0)
    pm = RewardModel(make_tiny_model()).eval()
    seqs = [[5, 17, 99, 2], [7, 8, 9, 10, 11, 12, 2], [40, 2]]
    alone = torch.stack([pm(torch.tensor([s]), torch.tensor([len(s) - 1]))[0] for s in seqs])   # no padding
    assert alone.unique().numel() == 3

    for pad_id in (0, 2, 300):                   # a pad equal to the end marker (SmolLM2 pads with <|im_end|>) too
        right, lengths = runs.right_pad(seqs, pad_id, "cpu")
        torch.testing.assert_close(pm(right, lengths - 1), alone, **NET_TOL)
        torch.testing.assert_close(score_ids(pm, seqs, pad_id, batch_size=2), alone, **NET_TOL)
        left, start = left_pad(seqs, pad_id, "cpu")
        last = torch.full((3,), left.shape[1] - 1)
        torch.testing.assert_close(pm(left, last, start=start), alone, **NET_TOL)
        torch.testing.assert_close(score_tokens(pm, left, start, last), alone, **NET_TOL)
        # per-position values agree with the pooled reward at the last column
        torch.testing.assert_close(pm.values(left, start)[:, -1], alone, **NET_TOL)
    # reading a padding column instead would give something else
    right, lengths = runs.right_pad(seqs, 0, "cpu")
    assert not torch.allclose(pm(right, torch.full((3,), right.shape[1] - 1)), alone, atol=1e-3)


def test_input_format_and_end_markers():
    tok = make_tiny_tokenizer()
    assert end_marker(tok, "chat") == "<|im_end|>" and end_marker(tok, "plain") == "\n\nHuman:"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = encode_input(tok, prompt, "yo", "chat")
    assert ids == tok.encode(prompt) + tok.encode("yo") + [2]          # ends with the stop token the policy emits
    plain = encode_input(tok, "\n\nHuman: hi\n\nAssistant:", "yo", "plain")
    assert tok.decode(plain) == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman:"   # the paper's prompt + ' ' + output
    assert encode_input(tok, prompt, "yo", "chat", max_length=5) == ids[-5:]  # the start of the prompt is cut


# --- training ----------------------------------------------------------------------------------------------
def _word(rng):
    return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 9)))


def write_marker_pairs(path, n, seed=0, label=1.0):
    """Synthetic separable preference: the chosen response contains '#', the rejected one does not."""
    tok, rng = make_tiny_tokenizer(), random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a = _word(rng)
            k = rng.randint(0, len(a))
            rec = {"id": f"p{i}", "prompt": tok.apply_chat_template([{"role": "user", "content": _word(rng)}]),
                   "chosen": a[:k] + "#" + a[k:], "rejected": _word(rng), "label": label, "format": "chat"}
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_model(make_tiny_model(), make_tiny_tokenizer(), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def marker_pairs(tmp_path_factory):
    return write_marker_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 320)


def pm_argv(pairs, out, model, *extra):
    return ["--pairs", str(pairs), "--out", str(out), "--model", str(model), "--no-progress",
            "--norm-samples", "0", "--save-every", "1000", "--eval-every", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def trained(tiny_dir, marker_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pm"
    rc = pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, "--lr", "3e-3", "--max-steps", "40", "--batch-size", "16",
                             "--micro-batch", "16", "--warmup", "4", "--dev", "64", "--norm-samples", "6",
                             "--norm-max-new-tokens", "4"))
    assert rc == 0
    return out


def test_learns_a_separable_preference(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    summary = [x for x in lines if x.get("summary")][-1]
    assert summary["step"] == 40 and summary["dev_n"] == 64
    assert summary["dev_accuracy"] > 0.95 and summary["dev_p_chosen"] > 0.9
    steps = [x for x in lines if "loss" in x and "eval" not in x and not x.get("summary")]
    assert [x["step"] for x in steps] == list(range(1, 41))
    assert all(k in steps[0] for k in ("accuracy", "p_chosen", "margin", "lr", "grad_norm", "tokens_per_s"))


def test_checkpoint_layout_and_normalisation_stats(trained):
    ckpt = trained / "reward"
    meta = json.loads((ckpt / "run.json").read_text())
    assert meta["stage"] == "pm" and meta["step"] == 40 and meta["config"]["lr"] == 3e-3
    stats = meta["reward_norm"]
    assert stats["n"] == 6 and math.isfinite(stats["mean"]) and stats["std"] > 0
    assert set(load_file(str(ckpt / "head.safetensors"))) == {"weight", "bias"}
    load_model(ckpt)                               # the trunk is a plain HF-format directory
    with pytest.raises(CheckpointError):           # ... but the run directory is not a policy
        load_model(trained)


def test_scoring_api_and_normalisation(trained):
    pm, tok, meta = load_reward_model(trained)
    prompt = tok.apply_chat_template([{"role": "user", "content": "abcde"}])
    r = score_texts(pm, tok, [prompt, prompt], ["ab#cd", "abecd"], batch_size=1)
    assert r.shape == (2,) and r.dtype == torch.float32 and r[0] > r[1]
    rn = score_texts(pm, tok, [prompt, prompt], ["ab#cd", "abecd"], normalize=True)
    s = meta["reward_norm"]
    # Against raw rewards of the same batch (r above came in batches of 1, whose sums run in another order,
    # and 1 / std would amplify that): the normalisation itself is two fp32 operations.
    r_same = score_texts(pm, tok, [prompt, prompt], ["ab#cd", "abecd"])
    torch.testing.assert_close(rn, (r_same - s["mean"]) / s["std"])
    torch.testing.assert_close(r_same, r, **NET_TOL)
    # token level, left-padded as PPO's rollouts are: the same numbers
    seqs = [encode_input(tok, prompt, x, "chat") for x in ("ab#cd", "abecd")]
    ids, start = left_pad(seqs, tok.pad_id, "cpu")
    torch.testing.assert_close(score_tokens(pm, ids, start, torch.full((2,), ids.shape[1] - 1)), r, **NET_TOL)


def test_train_layers_leaves_frozen_weights_bit_identical(tiny_dir, marker_pairs, tmp_path):
    out = tmp_path / "pm"
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, "--lr", "1e-2", "--max-steps", "3", "--batch-size", "8",
                               "--train-layers", "1")) == 0
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(out / "reward" / "model.safetensors"))
    for name in before:
        same = torch.equal(before[name], after[name])
        frozen = "layers.0." in name or "embed_tokens" in name
        assert same == frozen, name                 # frozen: bit-identical; trained (layer 1, final norm): moved
    assert json.loads((out / "reward" / "run.json").read_text())["n_trainable"] < sum(t.numel() for t in before.values())


def test_resume_gives_the_same_weights(tiny_dir, marker_pairs, tmp_path):
    common = ["--lr", "3e-3", "--max-steps", "6", "--batch-size", "8", "--micro-batch", "4", "--warmup", "2",
              "--epochs", "1"]
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "a", tiny_dir, *common)) == 0
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "b", tiny_dir, *common, "--stop-after", "3")) == 0
    assert json.loads((tmp_path / "b" / "reward" / "run.json").read_text())["step"] == 3
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "b", tiny_dir, *common, "--resume")) == 0
    for f in ("model.safetensors", "head.safetensors"):
        a = load_file(str(tmp_path / "a" / "reward" / f))
        b = load_file(str(tmp_path / "b" / "reward" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    def losses(run):
        return [x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in x and "eval" not in x and not x.get("summary")]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_gradient_checkpointing_gives_the_same_step(tiny_dir, marker_pairs, tmp_path):
    common = ("--lr", "1e-2", "--max-steps", "2", "--batch-size", "4", "--dev", "8")
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "a", tiny_dir, *common)) == 0
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "b", tiny_dir, *common, "--grad-checkpointing")) == 0
    a = load_file(str(tmp_path / "a" / "reward" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "reward" / "model.safetensors"))
    assert any(not torch.equal(a[k], load_file(str(tiny_dir / "model.safetensors"))[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def write_length_pairs(path, n, seed=0):
    """Pairs whose only cue is length: the chosen response is 1-2 random words, the rejected one 5-7."""
    tok, rng = make_tiny_tokenizer(), random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"p{i}", "prompt": tok.apply_chat_template([{"role": "user", "content": _word(rng)}]),
                   "chosen": " ".join(_word(rng) for _ in range(rng.randint(1, 2))),
                   "rejected": " ".join(_word(rng) for _ in range(rng.randint(5, 7))), "label": 1.0, "format": "chat"}
            f.write(json.dumps(rec) + "\n")
    return path


def test_length_head_takes_the_length_cue_and_resumes(tiny_dir, tmp_path):
    pairs = write_length_pairs(tmp_path / "pairs.jsonl", 256)
    common = ["--lr", "3e-3", "--max-steps", "30", "--batch-size", "16", "--micro-batch", "16", "--warmup", "3",
              "--dev", "64"]
    def dev_accuracy(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x).get("summary")][-1]["dev_accuracy"]
    assert pm_mod.main(pm_argv(pairs, tmp_path / "plain", tiny_dir, *common)) == 0
    assert pm_mod.main(pm_argv(pairs, tmp_path / "odin", tiny_dir, *common, "--length-head", "1")) == 0
    # Dev accuracy is the reward head's alone: the plain PM learns length; with the second head taking it, the
    # reward head is kept off it and the pairs have nothing else to learn.
    assert dev_accuracy(tmp_path / "plain") > 0.9
    assert dev_accuracy(tmp_path / "odin") < 0.75
    steps = [json.loads(x) for x in (tmp_path / "odin" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "loss" in x and "eval" not in x and not x.get("summary")]
    last = steps[-5:]
    assert sum(x["accuracy"] for x in last) / 5 > 0.85             # the two heads together do order the pairs
    # correlations with length in the direction the labels favour (here: shorter), over the last 5 steps
    assert sum(x["length_head_corr"] for x in last) / 5 > 0.8
    assert sum(abs(x["length_corr"]) for x in last) / 5 < 0.3
    ckpt = tmp_path / "odin" / "reward"
    assert set(load_file(str(ckpt / "length_head.safetensors"))) == {"weight", "bias"}
    pm, _, _ = load_reward_model(tmp_path / "odin")
    assert pm.length_head is None                                   # a scorer reads the reward head alone
    # resume: the second head and its optimiser state come back
    assert pm_mod.main(pm_argv(pairs, tmp_path / "b", tiny_dir, *common, "--length-head", "1", "--stop-after", "13")) == 0
    assert pm_mod.main(pm_argv(pairs, tmp_path / "b", tiny_dir, *common, "--length-head", "1", "--resume")) == 0
    for f in ("model.safetensors", "head.safetensors", "length_head.safetensors"):
        a, b = load_file(str(ckpt / f)), load_file(str(tmp_path / "b" / "reward" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # correlations over micro-batches of fewer than 4 pairs are refused before any work, naming the flag
    assert pm_mod.main(pm_argv(pairs, tmp_path / "c", tiny_dir, "--micro-batch", "2", "--length-head", "1")) == 2
    assert not (tmp_path / "c" / "reward").exists()


# --- pm-agreement ----------------------------------------------------------------------------------------
def test_pm_agreement_on_a_hand_made_file(trained, tmp_path, capsys):
    f = tmp_path / "human.jsonl"
    rows = [{"prompt": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "chosen": c, "rejected": r}
            for c, r in (("ab#c", "abdc"), ("#hhh", "hhhh"), ("gg#g", "gfgg"))]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert eval_cli.main(["pm-agreement", "--pm", str(trained), "--pairs", str(f), "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 3 and m["accuracy"] == 1.0
    assert f"accuracy {m['accuracy']:.4f}" in printed and f"mean P(chosen) {m['p_chosen']:.4f}" in printed
    pm, tok, _ = load_reward_model(trained)
    r_c = score_texts(pm, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r_r = score_texts(pm, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert m["p_chosen"] == pytest.approx(torch.sigmoid(r_c - r_r).mean().item(), abs=1e-6)
    # the same file with the sides swapped: the model now disagrees everywhere
    f.write_text("\n".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) for r in rows))
    assert eval_cli.main(["pm-agreement", "--pm", str(trained), "--pairs", str(f)]) == 0
    assert "accuracy 0.0000" in capsys.readouterr().out


# --- bad input ---------------------------------------------------------------------------------------------
def test_pairs_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(PairsError, match=r"p\.jsonl:2: missing field 'rejected'"):
        read_pairs([str(f)])
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "label": 1.5}\n')
    with pytest.raises(PairsError, match=r"p\.jsonl:1: label must be a number in \[0, 1\]"):
        read_pairs([str(f)])
    f.write_text("\n\n")
    with pytest.raises(PairsError, match=r"p\.jsonl: no pairs \(empty file\)"):
        read_pairs([str(f)])
    with pytest.raises(PairsError, match="nope.jsonl: no such file"):
        read_pairs([str(tmp_path / "nope.jsonl")])
    recs = read_pairs([str(write_marker_pairs(tmp_path / "ok.jsonl", 2))])
    assert recs[0]["label"] == 1.0 and recs[0]["format"] == "chat"


def test_length_balanced_keeps_as_many_longer_as_shorter_preferred_per_bucket():
    def pair(n_chosen, n_rejected, label=1.0):
        return {"chosen": "x" * n_chosen, "rejected": "y" * n_rejected, "label": label}
    recs = ([pair(10, 50)] * 7 + [pair(60, 20)] * 2          # bucket 40-79 (width 40): 7 shorter, 2 longer preferred
            + [pair(10, 200)] * 3                            # bucket 160-199: shorter only, none kept
            + [pair(50, 10, label=0.2)] * 2                  # label < 0.5: the rejected (shorter) is preferred
            + [pair(5, 5), pair(10, 70, label=0.5)])          # no length preference: kept
    keep = length_balanced(recs, 40, seed=0)
    assert keep == sorted(keep) and len(set(keep)) == len(keep)
    longer = [i for i in keep if recs[i]["label"] != 0.5 and len(recs[i]["chosen"]) != len(recs[i]["rejected"])
              and (len(recs[i]["chosen"]) > len(recs[i]["rejected"])) == (recs[i]["label"] > 0.5)]
    assert len(keep) == 2 + 2 + 2 and len(longer) == 2            # 2 longer + 2 of the 9 shorter-preferred, + 2
    assert {7, 8, 14, 15} <= set(keep) and not set(keep) & {9, 10, 11}
    assert length_balanced(recs, 40, seed=0) == keep                       # seeded
    assert len({tuple(length_balanced(recs, 40, seed=s)) for s in range(8)}) > 1
    assert len(length_balanced(recs, 1000, seed=0)) == 6                   # one bucket: 12 shorter, 2 longer
    with pytest.raises(ValueError, match="width must be >= 1"):
        length_balanced(recs, 0, seed=0)


def test_length_matched_cuts_the_longer_side_to_the_shorter_in_tokens(tiny_dir, marker_pairs, tmp_path, capsys):
    from rlcd.pairs import length_matched
    tok = make_tiny_tokenizer()
    recs = [{"chosen": "abc", "rejected": "abcdefgh", "label": 1.0, "id": "a"},
            {"chosen": "a long preferred answer", "rejected": "no", "label": 1.0, "id": "b"},
            {"chosen": "same", "rejected": "SAME", "label": 0.5, "id": "c"}]
    out = length_matched(recs, tok)
    for r, o in zip(recs, out):
        n = [len(tok.encode(o[k], add_bos=False)) for k in ("chosen", "rejected")]
        assert n[0] == n[1] == min(len(tok.encode(r[k], add_bos=False)) for k in ("chosen", "rejected"))
        assert o["label"] == r["label"] and o["id"] == r["id"]
    assert out[0]["chosen"] == "abc" and out[0]["rejected"] == "abc"          # the shorter side stays as it was
    assert out[1]["rejected"] == "no" and out[1]["chosen"] == "a " and out[2] == recs[2]
    assert recs[0]["rejected"] == "abcdefgh"                                   # the input is not changed
    # train.py pm --match-length trains on the cut pairs and says so
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "run", tiny_dir, "--max-steps", "2", "--match-length")) == 0
    assert "--match-length: the longer response of each train pair cut" in capsys.readouterr().err


def test_train_and_agreement_report_bad_input(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert pm_mod.main(pm_argv(empty, tmp_path / "run", tiny_dir)) == 2
    assert "empty.jsonl: no pairs (empty file)" in capsys.readouterr().err
    assert eval_cli.main(["pm-agreement", "--pm", str(tiny_dir), "--pairs", str(empty)]) == 2
    assert "no pairs (empty file)" in capsys.readouterr().err


def test_a_checkpoint_from_another_stage_is_refused(tiny_dir, marker_pairs, tmp_path, capsys):
    # A run directory written by train.py sft (policy/run.json with stage "sft").
    sft_run = tmp_path / "sft"
    model, tok = load_model(tiny_dir)
    (sft_run / "policy").mkdir(parents=True)
    save_model(model, tok, sft_run / "policy", extra_files={"run.json": json.dumps({"stage": "sft", "step": 1})})
    with pytest.raises(CheckpointError, match=r"a 'sft' run directory \(policy/\), not a 'pm' run"):
        load_reward_model(sft_run)
    with pytest.raises(CheckpointError, match="a 'sft' checkpoint, not a 'pm' one"):
        load_reward_model(sft_run / "policy")
    with pytest.raises(CheckpointError, match="plain model directory"):
        load_reward_model(tiny_dir)
    assert eval_cli.main(["pm-agreement", "--pm", str(sft_run), "--pairs", str(marker_pairs)]) == 2
    assert "not a 'pm' run" in capsys.readouterr().err
    # training a PM into that directory, or resuming it as a PM, is refused too
    assert pm_mod.main(pm_argv(marker_pairs, sft_run, tiny_dir, "--resume")) == 2
    assert "holds a 'sft' run" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_overwrites(tiny_dir, marker_pairs, tmp_path, capsys):
    out = tmp_path / "pm"
    args = ("--max-steps", "2", "--batch-size", "4")
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, *args, "--stop-after", "1")) == 0
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, *args)) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, "--max-steps", "2", "--batch-size", "4",
                               "--lr", "1", "--resume")) == 2
    assert "lr: 1e-05 -> 1.0" in capsys.readouterr().err
    assert pm_mod.main(pm_argv(marker_pairs, tmp_path / "fresh", tiny_dir, *args, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a setting the checkpoint does not record (one added to the stage since) resumes at its default only
    run = out / "reward" / "run.json"
    meta = json.loads(run.read_text())
    del meta["config"]["length_head"]
    run.write_text(json.dumps(meta))
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, *args, "--length-head", "1", "--resume")) == 2
    assert "length_head: None -> 1.0" in capsys.readouterr().err
    assert pm_mod.main(pm_argv(marker_pairs, out, tiny_dir, *args, "--resume")) == 0


def test_pairs_from_another_simulator_are_read_in_the_trunks_own_template():
    """A pair simulated by another model stores that model's chat template in `prompt`; PM training, SFT
    and agreement re-render it from `messages` with their own tokenizer (rlcd.pairs.in_own_template)."""
    from rlcd.pairs import in_own_template
    from rlcd.tasks import format_prompt

    tok = make_tiny_tokenizer()
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    foreign = {"prompt": "<|im_start|>system\nYou are another model.<|im_end|>\n" + format_prompt(msgs, "chat", tok),
               "chosen": "No.", "rejected": "Sure.", "format": "chat", "messages": msgs, "id": "x"}
    bare = {"prompt": "Human: hi\n\nAssistant:", "chosen": "a", "rejected": "b", "format": "plain", "id": "y"}
    own, kept = in_own_template([foreign, bare], tok)
    assert own["prompt"] == format_prompt(msgs, "chat", tok) != foreign["prompt"]
    assert kept == bare                                              # no messages: the prompt is kept
    assert in_own_template([foreign], tok, "plain")[0]["prompt"] == format_prompt(msgs, "plain", tok)
