"""Sample from a LLaMA or Qwen2 checkpoint.

    python generate.py --prompt "What is the capital of France?"
    python generate.py --model qwen2.5-coder-0.5b-instruct --prompt "What is the capital of France?"
    python generate.py --model runs/harmless/ppo --prompts-file prompts.jsonl --out answers.jsonl
    python generate.py --raw --prompt "Once upon a time" --temperature 0.8 --top-p 0.9

--model takes a built-in name (smollm2-135m-instruct, the default; qwen2.5-coder-0.5b-instruct;
qwen2.5-coder-1.5b-instruct: see models.checkpoint.BUILTIN_MODELS), a Hugging Face-format checkpoint
directory, or a run directory written by train.py. Prompts are wrapped in the checkpoint's chat template unless
--raw. A prompts file is JSONL ({"prompt": ...} or {"messages": [...]}) or plain text, one prompt a line.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from models import CheckpointError, load_model
from models.generation import SamplingParams, generate_texts
from rlcd.cli import parse_args
from rlcd.precision import resolve as resolve_precision


@dataclass
class Args:
    model: str = "smollm2-135m-instruct"   # built-in model name, checkpoint directory or run directory
    prompt: str | None = None              # a single prompt (printed answer)
    prompts_file: str | None = None        # JSONL or text file of prompts (one per line)
    out: str | None = None                 # write JSONL results here (default: print)
    max_new_tokens: int = 128              # tokens to generate per prompt
    temperature: float = 0.0               # 0 = greedy
    top_p: float = 1.0                     # nucleus sampling threshold (1 disables)
    top_k: int = 0                         # keep the k most likely tokens (0 disables)
    batch_size: int = 8                    # prompts per generation batch
    seed: int = 0                          # sampling seed
    device: str = "cpu"                    # cpu or cuda
    precision: str = "auto"                # auto, fp32 or bf16 (rlcd.precision): the weights' dtype
    attn_impl: str = "sdpa"                # naive, sdpa or triton
    raw: bool = False                      # do not apply the chat template
    compile: bool = False                  # torch.compile the decode step on a CPU too (always on CUDA: a CUDA graph)


def read_prompts(path: str) -> list[list[dict] | str]:
    """Messages lists (JSONL) or raw strings (text), one per non-empty line; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    out: list[list[dict] | str] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    is_jsonl = p.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            out.append(line)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append(rec["messages"])
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append(rec["prompt"])
        else:
            raise ValueError(f"{path}:{n}: expected an object with 'prompt' (string) or 'messages' (list)")
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="generate.py", description=__doc__.split("\n")[0])
    if (args.prompt is None) == (args.prompts_file is None):
        print("generate.py: give exactly one of --prompt or --prompts-file", file=sys.stderr)
        return 2
    try:
        dtype = resolve_precision(args.precision, args.device).inference_dtype
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
        model, tok = load_model(args.model, device=args.device, dtype=dtype,
                                attn_impl=args.attn_impl)
        texts = []
        for p in prompts:
            if args.raw:
                texts.append(p if isinstance(p, str) else "\n".join(m["content"] for m in p))
            else:
                msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
                texts.append(tok.apply_chat_template(msgs, add_generation_prompt=True))
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p)
        results = generate_texts(model, tok, texts, params, batch_size=args.batch_size, seed=args.seed,
                                 progress=len(texts) > args.batch_size, compile=args.compile or None)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for p, r in zip(prompts, results):
                f.write(json.dumps({"prompt": p, "response": r["text"], "finished": r["finished"],
                                    "model": args.model}, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} responses to {args.out}")
    else:
        for r in results:
            print(r["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
