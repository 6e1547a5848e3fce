"""Decode throughput of the generation engine.

    python bench/bench_generate.py                       # default model, fp32, CPU, batch 1 8 32
    python bench/bench_generate.py --device cuda --precision bf16 --batches 1 64 --random
    python bench/bench_generate.py --hf                  # also time transformers' generate (scratch env)

Each row generates exactly --new-tokens tokens (stop tokens disabled) after a ~40-token chat prompt,
greedy unless --temperature says otherwise (the pipeline samples at 0.7 with --top-p 0.9), and reports
decode tokens/s = batch * new tokens / wall time of the whole generate call (prefill included, as a
user sees it). One warm-up call per batch size and contender is excluded;
the timed calls alternate between contenders and the best of --repeats is reported. --random uses
random weights of the default model's shape (for a GPU machine, where the real weights cannot travel).
--hf runs Hugging Face transformers' `generate` on the same checkpoint directory with the same
settings; transformers is not a dependency of this project: install it in a scratch environment.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import describe  # noqa: E402
from models import load_model  # noqa: E402
from rlcd.precision import resolve as resolve_precision  # noqa: E402
from models.generation import SamplingParams, generate  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402

PROMPT = ("Write a short, friendly note to a neighbour asking them to water the plants on the balcony "
          "while I am away for the weekend.")


@dataclass
class Args:
    model: str = "smollm2-135m-instruct"   # checkpoint name or directory
    device: str = "cpu"                    # cpu or cuda
    precision: str = "auto"                # auto, fp32 or bf16 (rlcd.precision): the weights' dtype, transformers' too
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])  # batch sizes to time
    new_tokens: int = 64                   # tokens generated per row
    temperature: float = 0.0               # 0: greedy; else sampled (the pipeline samples at 0.7, top-p 0.9)
    top_p: float = 1.0                     # nucleus of the sampled rows (1.0 disables)
    repeats: int = 3                       # timed calls per batch size and contender (best reported)
    random: bool = False                   # random weights of the default model's shape
    hf: bool = False                       # also time transformers' generate
    attn_impl: str = "sdpa"                # naive, sdpa or triton
    threads: int = 0                       # torch threads on CPU (0 = leave as is)
    compile: bool = False                  # also time the torch.compile'd decode step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, device: str, repeats: int) -> dict:
    """Best wall time of each callable, after one warm-up call each (allocator, kernels, caches,
    compilation). The timed calls are interleaved round-robin, so that a slow spell of this shared
    machine hits every contender alike instead of whichever happened to run then."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    args = parse_args(Args, prog="bench_generate.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prec = resolve_precision(args.precision, args.device)
    except ValueError as e:
        raise SystemExit(f"bench_generate.py: {e}") from None
    dtype = prec.inference_dtype
    if args.random:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Transformer(ModelArgs.preset("smollm2-135m", attn_impl=args.attn_impl)).to(dtype).eval()
        prompt_ids = [1] + list(range(100, 139))            # 40 tokens of a fixed id pattern
        tok = None
    else:
        model, tok = load_model(args.model, device=args.device, dtype=dtype, attn_impl=args.attn_impl)
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p)
    name = describe(args.device)
    print(f"# {datetime.date.today()}  device={name}  threads={torch.get_num_threads()}  precision={prec.describe()}"
          f"  prompt={len(prompt_ids)} tokens  new={args.new_tokens}  temperature={args.temperature}  top_p={args.top_p}"
          f"  attn={args.attn_impl}"
          f"  weights={'random' if args.random else args.model}")
    hf = None
    if args.hf:
        import tempfile

        import transformers
        from models import save_model
        from models.checkpoint import resolve
        # The same weights: the checkpoint, or the random model written out in Hugging Face format.
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
            path = save_model(model, None, Path(tmp) / "random") if args.random else resolve(args.model)
            hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    print(f"{'batch':>5} {'ours tok/s':>11} {'ms/token':>9}" + (f" {'compiled':>9}" if args.compile else "")
          + (f" {'HF tok/s':>9} {'speed-up':>8}" if hf else ""))
    for B in args.batches:
        prompts = [prompt_ids] * B
        fns = {"ours": lambda: generate(model, prompts, params, stop_ids=[], pad_id=0, compile=False)}
        if args.compile:
            fns["compiled"] = lambda: generate(model, prompts, params, stop_ids=[], pad_id=0, compile=True)
        if hf is not None:
            ids = torch.tensor(prompts, device=args.device)
            sampled = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
                else dict(do_sample=False)
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **sampled,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
            fns["hf"] = torch.no_grad()(lambda: hf.generate(ids, **kw))
        t = timed(fns, args.device, args.repeats)
        rate = {name: B * args.new_tokens / sec for name, sec in t.items()}
        line = f"{B:>5} {rate['ours']:>11.1f} {1000 * t['ours'] / args.new_tokens:>9.2f}"
        if args.compile:
            line += f" {rate['compiled']:>9.1f}"
        if hf is not None:
            line += f" {rate['hf']:>9.1f} {rate['ours'] / rate['hf']:>7.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
