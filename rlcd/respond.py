"""Responses of policies to held-out prompts (`eval.py respond`), and the responses files they write, which
`eval.py compare` (rlcd/evaluate.py) reads back through read_responses and check_responses.

    python eval.py respond --policy base=smollm2-135m-instruct rlcd=runs/harmless/ppo --task harmless \\
        --split test --n-prompts 64 --out-dir runs/harmless/responses

Every policy answers the same held-out prompts (rlcd.prompts.load_prompts, one split) with the same
sampling settings and seed, one JSONL file per policy (DIR/NAME.jsonl). The prompts are rendered in
`format` with each policy's own tokenizer, ordered by (token length, id) and cut into fixed chunks of
`batch_size`; each chunk is one generate_texts call seeded from (seed, the chunk's ids), written by
rlcd/jsonl.py's writer, the one train.py simulate uses: a rerun skips chunks already complete,
regenerates a chunk that was cut short and writes only its missing records, so an interrupted file is
completed into exactly the file an uninterrupted run writes (on the same machine and batch size), and
under torchrun (`torchrun --nproc_per_node N eval.py respond ...`) the ranks share the chunks and rank 0
merges their shard files into NAME.jsonl in chunk order, so the file does not depend on N. A record
written with other settings is an error naming the file and line.

Record: id, policy, model, task, format, messages, prompt (the text the policy saw), response (cleaned
as in rlcd.tasks.clean: cut at the end-of-turn token or next turn), n_tokens (generated tokens, stop
token excluded), finished (stopped on a stop token or, in plain format, a next-turn marker rather than
at max_new_tokens), settings (everything that changes the sample; compare checks the files agree).

API
    Args(...); respond(args) -> {name: summary}       one responses file per policy, resumable
    read_responses(path) -> list[dict]; check_responses({path: records}) -> list[str] ids
    main(argv)                                        the eval.py command
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models import CheckpointError, load_model
from models.generation import SamplingParams, generate_texts
from rlcd import distributed
from rlcd.cli import parse_args, save_config
from rlcd.jsonl import Lines, append_chunks, done_ids, fixed_chunks, merge_shards, read_objects, seed_of
from rlcd.precision import resolve as resolve_precision
from rlcd.prompts import DataError, load_prompts
from rlcd.tasks import FORMATS, clean, format_prompt

RESPONSE_FIELDS = ("id", "policy", "model", "task", "format", "messages", "prompt", "response", "n_tokens",
                   "finished", "settings")


class ResponsesError(ValueError):
    """A responses file that cannot be used or does not match the others; one line naming file and line."""


@dataclass
class Args:
    """Responses of each policy to the same held-out prompts, one resumable JSONL per policy (eval.py respond)."""
    policy: list[str]                     # NAME=MODEL ... (a model name, checkpoint dir or train.py sft/ppo run dir)
    out_dir: str                          # writes OUT_DIR/NAME.jsonl per policy; existing files are completed
    task: str = "harmless"                # the prompt set (and, for compare, the judge's principle)
    prompts: str | None = None            # a prompts file instead of the task's built-in set
    split: str = "test"                   # train, dev or test
    n_prompts: int | None = None          # the first N prompts of the split (None: all)
    format: str = "chat"                  # chat (each policy's template) or plain (Human:/Assistant:)
    temperature: float = 0.7              # sampling temperature (0: greedy), as train.py simulate
    top_p: float = 0.9                    # nucleus threshold (1 disables)
    top_k: int = 0                        # keep the k most likely tokens (0 disables)
    max_new_tokens: int = 128             # tokens per response
    batch_size: int = 16                  # prompts per generation call and per saved chunk (changes the sample)
    seed: int = 0                         # sampling seed, the same for every policy
    device: str = "cpu"                   # cpu or cuda
    precision: str = "auto"               # auto, fp32 or bf16 (rlcd.precision): the policies' weights
    progress: bool = True                 # progress bar


def parse_policies(specs: list[str]) -> dict[str, str]:
    """NAME=MODEL strings -> {name: model}; a bare MODEL is named after its last path part."""
    out: dict[str, str] = {}
    for s in specs:
        name, sep, model = s.partition("=")
        if not sep:
            name, model = Path(s.rstrip("/")).name, s
        if not name or not model or "/" in name or name.startswith("."):
            raise ValueError(f"--policy {s!r}: expected NAME=MODEL with a plain NAME")
        if name in out:
            raise ValueError(f"--policy: the name {name!r} is given twice")
        out[name] = model
    return out


def _settings(args: Args) -> dict:
    """Everything that changes a policy's sample besides the policy itself (compare checks these agree)."""
    return {"task": args.task, "prompts": args.prompts or args.task, "split": args.split,
            "n_prompts": args.n_prompts, "format": args.format, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "seed": args.seed,
            "precision": resolve_precision(args.precision, args.device).name}


def _read_lines(path: Path) -> tuple[Lines, int]:
    """(line number, record) of every complete line of a responses file and the byte offset past the last
    one. A last line without its newline is a write cut short: left out here. Anything else unreadable
    is a ResponsesError naming the file and line (rlcd.jsonl.read_objects with partial_ok)."""
    lines, end = read_objects(path, ResponsesError, partial_ok=True)
    for lineno, rec in lines:
        where = f"{path}:{lineno}"
        missing = [k for k in RESPONSE_FIELDS if k not in rec]
        if missing:
            raise ResponsesError(f"{where}: not a responses record (eval.py respond), missing {', '.join(missing)}")
        if not isinstance(rec["response"], str) or not isinstance(rec["settings"], dict):
            raise ResponsesError(f"{where}: 'response' must be a string and 'settings' an object")
    return lines, end


def _moved_with(old: str, new: str, root: Path) -> bool:
    """Whether policy `old` (as a record names it) is `new` in a run directory `root` that moved (a
    pipeline's: its policies and responses/ inside it): `new` lies under root and `old`, which no longer
    exists, ends with the same path relative to it."""
    try:
        rel = Path(new).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return not Path(old).exists() and Path(old).parts[-len(rel.parts):] == rel.parts


def respond_policy(name: str, model_spec: str, prompts: list[dict], args: Args) -> dict:
    """Write (or complete) OUT_DIR/NAME.jsonl for one policy; returns a summary (under torchrun, the same
    on every rank, with the file complete on return)."""
    path = Path(args.out_dir) / f"{name}.jsonl"
    settings = _settings(args)
    ours = {"policy": name, "model": model_spec, **settings}

    def check(f: Path, lines: Lines) -> None:                   # records of this policy and these settings
        for lineno, rec in lines:
            theirs = {"policy": rec["policy"], "model": rec["model"], **rec["settings"]}
            diff = [k for k in ours if theirs.get(k) != ours[k]
                    and not (k == "model" and _moved_with(theirs[k], model_spec, path.parent.parent))]
            if diff:
                raise ResponsesError(
                    f"{f}:{lineno}: written with {', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}, but this "
                    f"run has {', '.join(f'{k}={ours[k]!r}' for k in diff)}; use another --out-dir")
    done = done_ids(path, _read_lines, check, "respond", "it will be redone")
    want = {r["id"] for r in prompts}
    if done - want:
        raise ResponsesError(f"{path}: holds {len(done - want)} prompt id(s) not in this run's prompts "
                             f"(e.g. {sorted(done - want)[0]}); use another --out-dir")
    if done == want:
        if distributed.is_main():                   # shards a killed run left complete
            merge_shards(path, [r["id"] for r in prompts], ResponsesError)
        distributed.barrier()
        return {"policy": name, "path": str(path), "n": len(want), "written": 0, "seconds": 0.0}

    model, tok = load_model(model_spec, device=distributed.device_for_rank(args.device),
                            dtype=resolve_precision(args.precision, args.device).inference_dtype)
    texts = [format_prompt(r["messages"], args.format, tok) for r in prompts]
    # (prompt record, rendered text, token length), in chunks of similar lengths (little padding).
    chunks = fixed_chunks([(r, t, len(tok.encode(t))) for r, t in zip(prompts, texts)], args.batch_size,
                          key=lambda it: (it[2], it[0]["id"]))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p)

    def make(chunk: list[tuple[dict, str, int]]) -> tuple[list[dict], int]:
        # The chunk's seed depends on its ids only, so a redone chunk samples exactly what it did.
        seed = seed_of("respond", args.seed, "\n".join(r["id"] for r, _, _ in chunk))
        results = generate_texts(model, tok, [t for _, t, _ in chunk], params, batch_size=len(chunk), seed=seed,
                                 progress=False)
        recs = []
        for (rec, text, _), res in zip(chunk, results):
            response, ended = clean(res, args.format, tok, require_end=False)
            recs.append({"id": rec["id"], "policy": name, "model": model_spec, "task": args.task,
                         "format": args.format, "messages": rec["messages"], "prompt": text,
                         "response": response or "", "n_tokens": len(res["token_ids"]), "finished": ended,
                         "settings": settings})
        return recs, sum(len(res["token_ids"]) for res in results)

    written, n_tokens, seconds = append_chunks(path, chunks, lambda it: it[0]["id"], done, make, ResponsesError,
                                               f"respond {name}", "prompt", args.progress)
    return {"policy": name, "path": str(path), "n": len(want), "written": written, "seconds": round(seconds, 1),
            "gen_tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None}


def respond(args: Args) -> dict:
    """Every policy of args.policy answers the same prompts; returns {name: summary}."""
    if args.format not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {args.format!r}")
    resolve_precision(args.precision, args.device)
    distributed.init(args.device)
    policies = parse_policies(args.policy)
    prompts = load_prompts(args.prompts or args.task, args.split, args.n_prompts)
    if not prompts:
        raise DataError(f"{args.prompts or args.task}: no prompts in split {args.split!r}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(args, out / "respond.config.json")
    return {name: respond_policy(name, spec, prompts, args) for name, spec in policies.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="eval.py respond", description=Args.__doc__)
    rc, summary = distributed.run_command(lambda: respond(args), (ResponsesError, DataError, CheckpointError,
                                                                 ValueError, FileNotFoundError), "eval.py respond")
    if rc:
        return rc
    for s in summary.values():
        distributed.print0(json.dumps(s))
    return 0


# --- reading and checking responses files -------------------------------------------------------------------
def read_responses(path: str | Path) -> list[dict]:
    """The records of a complete responses file; one policy, one settings, no repeated id."""
    path = Path(path)
    lines, end = _read_lines(path)
    if end < path.stat().st_size:
        raise ResponsesError(f"{path}:{len(path.read_bytes()[:end].splitlines()) + 1}: a partial last line "
                             f"(an interrupted eval.py respond); rerun it to complete the file")
    if not lines:
        raise ResponsesError(f"{path}: no responses (empty file)")
    first_no, first = lines[0]
    seen: dict[str, int] = {}
    for lineno, rec in lines:
        if rec["policy"] != first["policy"]:
            raise ResponsesError(f"{path}:{lineno}: policy {rec['policy']!r}, but line {first_no} has "
                                 f"{first['policy']!r}; one policy per file")
        if rec["settings"] != first["settings"]:
            diff = sorted(k for k in set(rec["settings"]) | set(first["settings"])
                          if rec["settings"].get(k) != first["settings"].get(k))
            raise ResponsesError(f"{path}:{lineno}: settings differ from line {first_no} ({', '.join(diff)})")
        if rec["id"] in seen:
            raise ResponsesError(f"{path}:{lineno}: prompt id {rec['id']} repeats line {seen[rec['id']]}")
        seen[rec["id"]] = lineno
        rec["_line"] = lineno
    return [rec for _, rec in lines]


def check_responses(files: dict[str, list[dict]]) -> list[str]:
    """The common prompt ids (in the first file's order) of files that must match: distinct policy names,
    the same settings (sampling, seed, prompts) and the same prompt ids. Errors name the file and line."""
    paths = list(files)
    if not paths:
        raise ResponsesError("no responses files")
    ref_path, ref = paths[0], files[paths[0]]
    ref_ids = {r["id"]: r for r in ref}
    names: dict[str, str] = {}
    for path in paths:
        recs = files[path]
        name = recs[0]["policy"]
        if name in names:
            raise ResponsesError(f"{path}:{recs[0]['_line']}: policy name {name!r} is also the policy of {names[name]}")
        names[name] = path
        s0, s = ref[0]["settings"], recs[0]["settings"]
        diff = sorted(k for k in set(s0) | set(s) if s0.get(k) != s.get(k))
        if diff:
            what = ", ".join(f"{k}={s.get(k)!r} vs {s0.get(k)!r}" for k in diff)
            raise ResponsesError(f"{path}:{recs[0]['_line']}: settings differ from {ref_path} ({what}); "
                                 f"the policies must answer with the same settings")
        ids = {r["id"] for r in recs}
        for r in recs:
            if r["id"] not in ref_ids:
                raise ResponsesError(f"{path}:{r['_line']}: prompt id {r['id']} is not in {ref_path}")
            if r["messages"] != ref_ids[r["id"]]["messages"]:
                raise ResponsesError(f"{path}:{r['_line']}: prompt id {r['id']} has other messages than in {ref_path}")
        missing = [r for r in ref if r["id"] not in ids]
        if missing:
            raise ResponsesError(f"{path}: lacks prompt id {missing[0]['id']} ({ref_path}:{missing[0]['_line']})"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return [r["id"] for r in ref]
