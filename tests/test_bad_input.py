"""Bad input to every command: a flag out of range, a corrupt checkpoint, a broken data file. Each ends in
one line on stderr naming the flag or file at fault and exit code 2, before any model is loaded (the
flag cases name a model that does not exist, so a check that came after loading would report that
instead), and never in a traceback."""
import dataclasses
import json
import shutil
import typing

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

import eval as eval_cli
import generate as generate_cli
import train as train_cli
from models import save_model
from rlcd import cli
from rlcd import evaluate as ev
from rlcd.reward import HEAD_FILE, RewardModel

NO_MODEL = "no/such/model"


def one_line_error(capsys, main, argv, alone: bool = True) -> str:
    """Run an entry point main(argv); assert exit code 2, no traceback, and an error of one line: the
    whole of stderr, or with alone=False its last line (after what the command reported before failing)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:                       # argparse and the flag checks exit from parse_args
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and (len(err.splitlines()) == 1 or not alone), err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tok = make_tiny_tokenizer()
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": tok.apply_chat_template(
        [{"role": "user", "content": f"word {i}"}]), "chosen": "yes", "rejected": "no", "format": "chat"}) + "\n"
        for i in range(24)))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i} {s}", "split": s}) + "\n"
                               for i in range(8) for s in ("train", "test")))
    good = save_model(make_tiny_model(), tok, d / "good")
    return {"dir": d, "pairs": pairs, "prompts": prompts, "good": good}


# --- flags -----------------------------------------------------------------------------------------------------
def train(*argv):
    return train_cli.main, list(argv)


def evaluate(*argv):
    return eval_cli.main, list(argv)


def generate(*argv):
    return generate_cli.main, ["--model", NO_MODEL, "--prompt", "hi", *argv]


SFT = ("sft", "--model", NO_MODEL, "--pairs", "p.jsonl", "--out", "never")
PM = ("pm", "--model", NO_MODEL, "--pairs", "p.jsonl", "--out", "never")
PPO = ("ppo", "--policy", NO_MODEL, "--pm", NO_MODEL, "--out", "never")
SIMULATE = ("simulate", "--model", NO_MODEL, "--out", "never.jsonl")
RESPOND = ("respond", "--policy", f"a={NO_MODEL}", "--out-dir", "never")

FLAG_CASES = [
    # (entry point and argv, what the one line must say)
    (generate("--max-new-tokens", "0"), "generate.py: --max-new-tokens must be >= 1, got 0"),
    (generate("--temperature", "-1"), "generate.py: --temperature must be >= 0 (0 = greedy), got -1.0"),
    (generate("--top-p", "1.5"), "generate.py: --top-p must be in (0, 1] (1 = off), got 1.5"),
    (generate("--top-p", "0"), "--top-p must be in (0, 1]"),
    (generate("--top-k", "-1"), "--top-k must be >= 0 (0 = off), got -1"),
    (generate("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (generate("--seed", "-3"), "--seed must be >= 0, got -3"),
    (generate("--batch-size", "x"), "argument --batch-size: invalid int value: 'x'"),
    (generate("--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    ((generate_cli.main, ["--model", NO_MODEL]), "give exactly one of --prompt or --prompts-file"),
    (train(*SFT, "--batch-size", "0"), "train.py sft: --batch-size must be >= 1, got 0"),
    (train(*SFT, "--micro-batch", "0"), "train.py sft: --micro-batch must be >= 1, got 0"),
    (train(*SFT, "--lr", "-1"), "train.py sft: --lr must be > 0, got -1.0"),
    (train(*SFT, "--lr", "nan"), "--lr must be > 0, got nan"),
    (train(*SFT, "--epochs", "0"), "--epochs must be > 0, got 0.0"),
    (train(*SFT, "--max-length", "0"), "--max-length must be >= 1, got 0"),
    (train(*SFT, "--dev", "-0.1"), "--dev must be >= 0, got -0.1"),
    (train("sft", "--out", "never"), "the following arguments are required: --pairs"),
    (train(*PM, "--weight-decay", "-0.1"), "train.py pm: --weight-decay must be >= 0, got -0.1"),
    (train(*PM, "--betas", "0.9", "1.5"), "--betas must be in [0, 1), got 1.5"),
    (train(*PM, "--min-lr-ratio", "2"), "--min-lr-ratio must be in [0, 1], got 2.0"),
    (train(*PM, "--balance-length", "-1"), "train.py pm: --balance-length must be >= 0 (0 = off), got -1"),
    (train(*PM, "--norm-temperature", "-0.5"), "--norm-temperature must be >= 0 (0 = greedy), got -0.5"),
    (train(*PPO, "--max-new-tokens", "0"), "train.py ppo: --max-new-tokens must be >= 1, got 0"),
    (train(*PPO, "--iterations", "0"), "--iterations must be >= 1, got 0"),
    (train(*PPO, "--clip", "0"), "--clip must be > 0, got 0.0"),
    (train(*PPO, "--lam", "1.5"), "--lam must be in [0, 1], got 1.5"),
    (train(*PPO, "--kl-target", "0"), "--kl-target must be > 0, got 0.0"),
    (train(*PPO, "--temperature", "0"), "train.py ppo: --temperature must be > 0 (PPO needs a sampling distribution)"),
    (train(*PPO, "--minibatches", "3"), "train.py ppo: --minibatches must divide --batch-size"),
    (train(*PPO, "--value-model", "both"), "train.py ppo: --value-model must be one of"),
    (train(*SIMULATE, "--temperature", "-1"), "train.py simulate: --temperature must be >= 0 (0 = greedy), got -1.0"),
    (train(*SIMULATE, "--top-p", "1.5"), "train.py simulate: --top-p must be in (0, 1]"),
    (train(*SIMULATE, "--max-new-tokens", "0"), "--max-new-tokens must be >= 1, got 0"),
    (train(*SIMULATE, "--n-prompts", "0"), "--n-prompts must be >= 1, got 0"),
    (train(*SIMULATE, "--max-tries", "0"), "--max-tries must be >= 1, got 0"),
    (train("stats", "x.jsonl", "--batch-size", "0"), "train.py stats: --batch-size must be >= 1, got 0"),
    (train("pipeline", "--out", "never", "--seed", "-1"), "train.py pipeline: --seed must be >= 0, got -1"),
    (evaluate(*RESPOND, "--temperature", "-1"), "eval.py respond: --temperature must be >= 0 (0 = greedy), got -1.0"),
    (evaluate(*RESPOND, "--top-p", "2"), "eval.py respond: --top-p must be in (0, 1]"),
    (evaluate(*RESPOND, "--max-new-tokens", "0"), "eval.py respond: --max-new-tokens must be >= 1, got 0"),
    (evaluate("compare", "--responses", "a.jsonl", "b.jsonl", "--tie", "0.5"),
     "eval.py compare: --tie must be in [0, 0.5), got 0.5"),
    (evaluate("compare", "--responses", "a.jsonl", "b.jsonl", "--n-boot", "0"), "--n-boot must be >= 1, got 0"),
    (evaluate("pm-agreement", "--pm", NO_MODEL, "--pairs", "p.jsonl", "--batch-size", "0"),
     "eval.py pm-agreement: --batch-size must be >= 1, got 0"),
    (evaluate("judge-agreement", "--pairs", "p.jsonl", "--folds", "1"),
     "eval.py judge-agreement: --folds must be >= 2, got 1"),
    (evaluate("judge-agreement", "--pairs", "p.jsonl", "--limit", "0"), "--limit must be >= 1, got 0"),
]


@pytest.mark.parametrize("case, expected", FLAG_CASES, ids=[" ".join(c[0][1][-2:]) for c in FLAG_CASES])
def test_a_bad_flag_is_one_line_before_anything_runs(case, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, argv = case
    assert expected in one_line_error(capsys, main, argv)
    assert not (tmp_path / "never").exists()                          # no run directory was created


def test_a_bad_pipeline_setting_stops_before_the_first_stage(capsys, tmp_path):
    out = tmp_path / "pipe"
    err = one_line_error(capsys, train_cli.main, ["pipeline", "--out", str(out), "--set", "ppo.lr=-1"])
    assert "stage ppo-rlcd (train.py ppo): --lr must be > 0, got -1" in err
    err = one_line_error(capsys, train_cli.main, ["pipeline", "--out", str(out), "--set", "sft.no_such=1"])
    assert "stage sft (train.py sft): unrecognized arguments: --no-such 1" in err
    assert not out.exists()


def command_classes():
    import rlcd.dpo
    import rlcd.pipeline
    import rlcd.plot
    import rlcd.pm
    import rlcd.ppo
    import rlcd.respond
    import rlcd.sft
    import rlcd.simulate

    return [generate_cli.Args, rlcd.simulate.Args, rlcd.simulate.StatsArgs, rlcd.pm.Args, rlcd.sft.Args,
            rlcd.ppo.Args, rlcd.dpo.Args, rlcd.respond.Args, ev.CompareArgs, ev.JudgeAgreementArgs, rlcd.pm.PMAgreementArgs,
            rlcd.pipeline.Args, rlcd.plot.Args]


def test_every_numeric_flag_has_a_rule_its_default_keeps():
    for cls in command_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = {a for t in (hints[f.name], *typing.get_args(hints[f.name])) for a in (t, *typing.get_args(t))}
            if kinds & {int, float} and hints[f.name] is not bool:
                assert f.name in cli.RULES, f"{cls.__module__}.{cls.__name__}.{f.name} has no rule in rlcd.cli.RULES"
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            cli.check_value(f.name, default)


def test_boundary_values_that_mean_something_are_accepted():
    a = cli.read_args(generate_cli.Args, ["--prompt", "x", "--temperature", "0", "--top-p", "1", "--top-k", "0",
                                          "--max-new-tokens", "1", "--seed", "0"])
    assert (a.temperature, a.top_p, a.top_k, a.max_new_tokens) == (0.0, 1.0, 0, 1)
    import rlcd.sft
    a = cli.read_args(rlcd.sft.Args, ["--pairs", "p", "--out", "o", "--grad-clip", "0", "--train-layers", "0",
                                      "--save-every", "0", "--max-steps", "0", "--warmup", "0", "--dev", "0"])
    assert (a.grad_clip, a.train_layers, a.save_every, a.dev) == (0.0, 0, 0, 0.0)


# --- checkpoints ---------------------------------------------------------------------------------------------
def _rewrite(f, fn):
    f.write_bytes(fn(f.read_bytes()))


def _shard(d):
    """Split model.safetensors into two shards with an index, as large checkpoints are stored."""
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    files = {n: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in sorted(set(files.values())):
        save_file({n: state[n] for n in names if files[n] == file}, str(d / file))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))


def _retensor(d, name, fn):
    state = load_file(str(d / "model.safetensors"))
    state[name] = fn(state[name])
    save_file(state, str(d / "model.safetensors"))


def _config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | changes))


UP = "model.layers.0.mlp.up_proj.weight"
CORRUPTIONS = {
    # name: (how to break a checkpoint directory d, the file (relative to d) and words the error must name)
    "truncated": (lambda d: _rewrite(d / "model.safetensors", lambda b: b[:len(b) // 2]),
                  "model.safetensors", "not a readable safetensors file"),
    "garbage": (lambda d: _rewrite(d / "model.safetensors", lambda b: bytes(range(256)) * 8),
                "model.safetensors", "not a readable safetensors file"),
    "empty": (lambda d: _rewrite(d / "model.safetensors", lambda b: b""),
              "model.safetensors", "not a readable safetensors file"),
    "missing-shard": (lambda d: (_shard(d), (d / "model-00002-of-00002.safetensors").unlink()),
                      "model-00002-of-00002.safetensors", "listed in model.safetensors.index.json but missing"),
    "truncated-shard": (lambda d: (_shard(d), _rewrite(d / "model-00001-of-00002.safetensors", lambda b: b[:-100])),
                        "model-00001-of-00002.safetensors", "not a readable safetensors file"),
    "bad-index": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("{\"weight_map\": 3")),
                  "model.safetensors.index.json", "not a safetensors index"),
    "int-tensor": (lambda d: _retensor(d, UP, lambda t: t.to(torch.int32)), "model.safetensors",
                   f"tensor '{UP}' has dtype I32"),
    "misshaped": (lambda d: _retensor(d, UP, lambda t: t[:-1]), "model.safetensors",
                  f"tensor '{UP}' has shape"),
    "config-json": (lambda d: (d / "config.json").write_text("{not json"), "config.json", "invalid JSON"),
    "config-value": (lambda d: _config(d, hidden_size="64"), "config.json", "hidden_size must be a positive integer"),
    "config-heads": (lambda d: _config(d, num_key_value_heads=3), "config.json", "must divide n_heads"),
    "tokenizer": (lambda d: (d / "tokenizer.json").write_text("garbage"), "tokenizer.json",
                  "not a readable tokenizer file"),
}


@pytest.fixture(scope="module")
def broken(data, tmp_path_factory):
    """{corruption: (a checkpoint directory with it, a preference-model run whose trunk has it)}."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (corrupt, _, _) in CORRUPTIONS.items():
        d = shutil.copytree(data["good"], root / name)
        head = {k: v.contiguous() for k, v in RewardModel(make_tiny_model()).head.state_dict().items()}
        save_file(head, str(d / f"{HEAD_FILE}.safetensors"))
        (d / "run.json").write_text(json.dumps({"stage": "pm", "step": 1, "total_steps": 1, "config": {}}))
        corrupt(d)
        pm_run = root / f"pm-{name}"
        shutil.copytree(d, pm_run / "reward")
        out[name] = (d, pm_run)
    return out


def checkpoint_commands(ckpt, pm_run, data, tmp_path):
    """Every command that loads a model or a preference model from a directory, pointed at a broken one."""
    pairs, prompts = str(data["pairs"]), str(data["prompts"])
    good = str(data["good"])
    return {
        "generate": (generate_cli.main, ["--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]),
        "sft": (train_cli.main, ["sft", "--model", str(ckpt), "--pairs", pairs, "--out", str(tmp_path / "sft"),
                                 "--no-progress", "--batch-size", "8", "--micro-batch", "4"]),
        "pm": (train_cli.main, ["pm", "--model", str(ckpt), "--pairs", pairs, "--out", str(tmp_path / "pm"),
                                "--no-progress", "--batch-size", "8", "--micro-batch", "4", "--norm-samples", "0"]),
        "simulate": (train_cli.main, ["simulate", "--model", str(ckpt), "--prompts", prompts, "--no-progress",
                                      "--out", str(tmp_path / "pairs.jsonl"), "--max-new-tokens", "2"]),
        "ppo": (train_cli.main, ["ppo", "--policy", good, "--pm", str(pm_run), "--prompts", prompts,
                                 "--out", str(tmp_path / "ppo"), "--batch-size", "4", "--micro-batch", "4"]),
        "respond": (eval_cli.main, ["respond", "--policy", f"a={ckpt}", "--prompts", prompts, "--no-progress",
                                    "--out-dir", str(tmp_path / "responses"), "--max-new-tokens", "2"]),
        "pm-agreement": (eval_cli.main, ["pm-agreement", "--pm", str(pm_run), "--pairs", pairs]),
    }


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["generate", "sft", "pm", "simulate", "ppo", "respond", "pm-agreement"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(command, corruption, broken, data, tmp_path, capsys):
    ckpt, pm_run = broken[corruption]
    main, argv = checkpoint_commands(ckpt, pm_run, data, tmp_path)[command]
    _, file, words = CORRUPTIONS[corruption]
    err = one_line_error(capsys, main, argv)
    where = (pm_run / "reward" if command in ("ppo", "pm-agreement") else ckpt) / file
    assert str(where) in err and words in err, err


def test_a_broken_preference_model_head_is_named(data, tmp_path, capsys):
    run = tmp_path / "pm"
    reward = shutil.copytree(data["good"], run / "reward")
    (reward / "run.json").write_text(json.dumps({"stage": "pm", "step": 1, "total_steps": 1, "config": {}}))
    head = reward / f"{HEAD_FILE}.safetensors"
    head.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")                 # a header that ends too soon
    argv = ["pm-agreement", "--pm", str(run), "--pairs", str(data["pairs"])]
    assert f"{head}: not a readable safetensors file" in one_line_error(capsys, eval_cli.main, argv)
    save_file({"weight": torch.zeros(1, 3)}, str(head))                     # another model's head
    assert f"{head}: does not fit the trunk" in one_line_error(capsys, eval_cli.main, argv)


# --- resuming ------------------------------------------------------------------------------------------------
def sft_argv(model, pairs, out, *extra):
    return ["sft", "--model", str(model), "--pairs", str(pairs), "--out", str(out), "--no-progress",
            "--batch-size", "8", "--micro-batch", "8", "--max-steps", "2", "--save-every", "1", "--eval-every", "0",
            "--dev", "0", *extra]


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """An sft run stopped after step 1 of 2, in a directory beside its pairs file."""
    base = tmp_path_factory.mktemp("stopped") / "x"
    base.mkdir()
    pairs = shutil.copy(data["pairs"], base / "pairs.jsonl")
    assert train_cli.main(sft_argv(data["good"], pairs, base / "sft", "--stop-after", "1")) == 0
    return base


def test_a_corrupt_trainer_state_is_named(stopped_run, data, tmp_path, capsys):
    base = shutil.copytree(stopped_run, tmp_path / "x")
    state = base / "sft" / "policy" / "trainer_state.pt"
    _rewrite(state, lambda b: b[:len(b) // 3])
    # The run reports its data first, then fails on reading the state, before its first step.
    err = one_line_error(capsys, train_cli.main, sft_argv(data["good"], base / "pairs.jsonl", base / "sft", "--resume"),
                         alone=False)
    assert err.startswith(f"train.py sft: {state}: unreadable (RuntimeError: PytorchStreamReader failed")


def test_a_corrupt_ppo_checkpoint_is_named(data, tmp_path, capsys):
    from test_ppo import save_pm

    pm = save_pm(make_tiny_model(1), make_tiny_tokenizer(), tmp_path / "pm")
    argv = ["ppo", "--policy", str(data["good"]), "--pm", str(pm), "--prompts", str(data["prompts"]), "--out",
            str(tmp_path / "ppo"), "--batch-size", "4", "--micro-batch", "4", "--max-new-tokens", "4",
            "--iterations", "2", "--no-normalize-reward"]
    assert train_cli.main(argv + ["--stop-after", "1"]) == 0
    ckpt = tmp_path / "ppo" / "policy"
    for file, words in (("value.safetensors", "not a readable safetensors file"),
                        ("trainer_state.pt", "unreadable (RuntimeError: PytorchStreamReader failed")):
        good = (ckpt / file).read_bytes()
        (ckpt / file).write_bytes(good[:100])
        assert f"{ckpt / file}: {words}" in one_line_error(capsys, train_cli.main, argv + ["--resume"])
        (ckpt / file).write_bytes(good)


@pytest.mark.parametrize("how", ["moved", "relative"])
def test_a_run_resumes_under_another_path(how, stopped_run, data, tmp_path, monkeypatch, capsys):
    base = shutil.copytree(stopped_run, tmp_path / "moved" / "y")               # the directory moved
    if how == "relative":                                                       # ... and is named relative to here
        monkeypatch.chdir(tmp_path)
        base = base.relative_to(tmp_path)
    argv = sft_argv(data["good"], base / "pairs.jsonl", base / "sft" if how == "moved" else f"./{base}/sft", "--resume")
    assert train_cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((base / "sft" / "policy" / "run.json").read_text())["step"] == 2
    # another pairs file is still another setting
    other = shutil.copy(data["pairs"], tmp_path / "other.jsonl")
    err = one_line_error(capsys, train_cli.main, sft_argv(data["good"], other, base / "sft", "--resume"))
    assert "--resume with different settings (pairs:" in err


def test_responses_resume_after_their_run_directory_moved(data, tmp_path, capsys):
    old = tmp_path / "old"
    policy = shutil.copytree(data["good"], old / "ppo-rlcd")                   # a policy inside the run directory

    def respond(root):
        return eval_cli.main(["respond", "--policy", f"rlcd={root / 'ppo-rlcd'}", "--prompts", str(data["prompts"]),
                              "--out-dir", str(root / "responses"), "--max-new-tokens", "2", "--no-progress"])
    assert respond(old) == 0
    new = tmp_path / "new"
    old.rename(new)
    assert respond(new) == 0                                                   # complete: nothing to redo
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["written"] == 0
    shutil.copytree(new / "ppo-rlcd", policy)            # a policy at the old place: the file is its responses
    assert "written with model=" in one_line_error(capsys, respond, new)


# --- data files ----------------------------------------------------------------------------------------------
def test_sft_refuses_a_label_pm_refuses(data, tmp_path, capsys):
    bad = tmp_path / "nan.jsonl"
    lines = data["pairs"].read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + [lines[2].replace('"format"', '"label": NaN, "format"')] + lines[3:]) + "\n")
    for stage in ("sft", "pm"):
        err = one_line_error(capsys, train_cli.main, [stage, "--model", NO_MODEL, "--pairs", str(bad),
                                                      "--out", str(tmp_path / stage), "--no-progress"])
        assert f"{bad}:3: label must be a number in [0, 1], got nan" in err


def test_compare_refuses_one_policy_before_loading_the_judge(tmp_path, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(ev, "load_model", no_loading)
    rec = {"id": "p0", "policy": "base", "model": "m", "task": "harmless", "format": "chat",
           "messages": [{"role": "user", "content": "q"}], "prompt": "q", "response": "a", "n_tokens": 1,
           "finished": True, "settings": {"task": "harmless"}}
    f = tmp_path / "base.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    for files in ([f], [f, f]):
        err = one_line_error(capsys, eval_cli.main, ["compare", "--responses", *map(str, files)])
        assert "--responses" in err and "at least two policies" in err
    err = one_line_error(capsys, eval_cli.main, ["compare", "--responses", str(f), f"{tmp_path}/./base.jsonl"])
    assert "policy name 'base' is also the policy of" in err


def test_a_missing_prompts_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    err = one_line_error(capsys, generate_cli.main, ["--model", NO_MODEL, "--prompts-file", str(missing)])
    assert f"{missing}: no such file" in err
