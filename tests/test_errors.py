"""Bad input gets one clear line naming the file, tensor or line at fault."""
import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

import generate as generate_cli
from models import CheckpointError, load_model, save_model
from models.generation import SamplingParams, generate


@pytest.fixture
def ckpt(tmp_path):
    return save_model(make_tiny_model(), make_tiny_tokenizer(), tmp_path / "ckpt")


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_not_a_llama_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a LLaMA checkpoint"):
        load_model(ckpt)


def test_missing_and_misshaped_tensors_are_named(ckpt):
    f = ckpt / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(3, 3\)"):
        load_model(ckpt)


def test_prompt_longer_than_context():
    model = make_tiny_model()          # context 256
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(model, [[1] * 250], SamplingParams(max_new_tokens=10), [2], 0)


def test_prompts_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid JSON"):
        generate_cli.read_prompts(str(f))
    f.write_text('{"prompt": "ok"}\n\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3: expected an object"):
        generate_cli.read_prompts(str(f))
    t = tmp_path / "p.txt"
    t.write_text("first\n\nsecond\n")
    assert generate_cli.read_prompts(str(t)) == ["first", "second"]


def test_cli_prints_one_line_error(tmp_path, capsys):
    rc = generate_cli.main(["--model", str(tmp_path), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no config.json" in err


def test_cli_end_to_end_on_a_checkpoint_dir(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    out = tmp_path / "out.jsonl"
    rc = generate_cli.main(["--model", str(ckpt), "--prompts-file", str(prompts), "--out", str(out),
                            "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "50"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and [r["prompt"] for r in rows] == ["hello", "world"]
    assert all(isinstance(r["response"], str) for r in rows)
