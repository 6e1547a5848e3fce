"""Pairs files: the JSONL records `train.py simulate` writes (its docstring has the full schema) and the
preference model, SFT and the evaluations read. One error type, PairsError, whose message is one line
naming the file and line; the lines themselves are read by rlcd.jsonl.read_objects.

    resolve_pairs(spec) -> list[str]                  "human" -> the cached PyRIT pairs file
    read_pairs(paths, default_format="chat", format_override=None) -> list[dict]   validated records
    check_format(fmt, where) -> fmt                                              "chat" or "plain"
    check_label(rec, where) -> float                                             a label in [0, 1]
    in_own_template(recs, tok, fmt=None) -> list[dict]     prompts re-rendered with the reader's tokenizer
    length_difference(rec) -> int                          len(chosen) - len(rejected), stripped characters
    length_balanced(recs, width, seed) -> list[int]        a subsample without a length preference
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from rlcd.jsonl import read_objects
from rlcd.tasks import FORMATS, format_prompt


class PairsError(ValueError):
    """A pairs file that cannot be read, used or resumed; the message is one line naming the file and line."""


def check_format(fmt: str, where: str) -> str:
    """`fmt` if it is a prompt format (rlcd.tasks.FORMATS), else a PairsError at `where` (file:line)."""
    if fmt not in FORMATS:
        raise PairsError(f"{where}: format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def check_label(rec: dict, where: str) -> float:
    """The record's label (P(chosen is better); 1.0 when absent) as a float, else a PairsError at `where`
    (file:line): it must be a number in [0, 1], so NaN, infinities, booleans and strings are refused."""
    label = rec.get("label", 1.0)
    if not isinstance(label, (int, float)) or isinstance(label, bool) or not 0.0 <= label <= 1.0:
        raise PairsError(f"{where}: label must be a number in [0, 1], got {label!r}")
    return float(label)


def resolve_pairs(spec: list[str] | str) -> list[str]:
    """Pairs file paths; "human" stands for the PyRIT human-labelled pairs (built and cached on first use)."""
    out = []
    for s in [spec] if isinstance(spec, str) else spec:
        if s == "human":
            from rlcd.human_pairs import human_pairs_path
            s = str(human_pairs_path())
        out.append(s)
    return out


def read_pairs(paths: list[str] | str, default_format: str = "chat", format_override: str | None = None,
               ) -> list[dict]:
    """Read JSONL pairs: each line needs string fields prompt, chosen, rejected; optional label (float in
    [0, 1], default 1.0), format ("chat" | "plain", default `default_format`) and id (default: the prompt).
    Returns records with those six keys filled in (plus the file's other fields)."""
    recs: list[dict] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        lines, _ = read_objects(path, PairsError)
        for n, rec in lines:
            for k in ("prompt", "chosen", "rejected"):
                if k not in rec:
                    raise PairsError(f"{path}:{n}: missing field {k!r} (a pair needs prompt, chosen, rejected)")
                if not isinstance(rec[k], str):
                    raise PairsError(f"{path}:{n}: field {k!r} must be a string, got {type(rec[k]).__name__}")
            label = check_label(rec, f"{path}:{n}")
            fmt = check_format(format_override or rec.get("format") or default_format, f"{path}:{n}")
            recs.append({**rec, "label": label, "format": fmt, "id": str(rec.get("id", rec["prompt"]))})
        if not lines:
            raise PairsError(f"{path}: no pairs (empty file)")
    return recs


def in_own_template(recs: list[dict], tok, fmt: str | None = None) -> list[dict]:
    """The records with each prompt re-rendered from its `messages` by `tok`, in `fmt` (default: the
    record's own format). Pairs simulated by another model (train.py pipeline --simulator) carry that
    model's chat template in `prompt`; a preference model or SFT on this trunk must see the prompt as its
    own policy will at PPO time. For pairs simulated by the trunk's own model the text is unchanged (the
    stored neutral prompt is exactly this rendering). Records without messages keep their prompt."""
    return [{**r, "prompt": format_prompt(r["messages"], fmt or r["format"], tok), "format": fmt or r["format"]}
            if r.get("messages") else r for r in recs]


def length_difference(rec: dict) -> int:
    """Characters of the stripped chosen response minus those of the rejected one: the one measure of
    length that the length split of every agreement figure (rlcd.judge.length_sides) and the PM's length
    balancing share."""
    return len(rec["chosen"].strip()) - len(rec["rejected"].strip())


def length_matched(recs: list[dict], tok) -> list[dict]:
    """The records with the longer response of each pair cut to the shorter one's length in `tok`'s tokens
    (decoded back to text), so that within a pair the two sides are equally long and a Bradley-Terry model
    cannot order them by length at all; what is left to separate them is what they say, and whether they
    were cut. Labels are unchanged; responses of equal length stay as they are."""
    out = []
    for r in recs:
        ids = {k: tok.encode(r[k], add_bos=False) for k in ("chosen", "rejected")}
        n = min(map(len, ids.values()))
        out.append({**r, **{k: tok.decode(v[:n]) for k, v in ids.items() if len(v) > n}})
    return out


def length_balanced(recs: list[dict], width: int, seed: int) -> list[int]:
    """Indices of a subsample of `recs` in which the preferred response is as often the longer as the
    shorter, at every size of the difference: pairs are bucketed by |len(chosen) - len(rejected)|
    (characters of the stripped texts, buckets `width` wide) and each bucket keeps a seeded random
    min(n_longer, n_shorter) of either side (the length balancing of Singhal et al. 2023, "A Long Way to
    Go"). The preferred response is the chosen one where the label is above 0.5, the rejected one below;
    pairs of equal lengths or label 0.5 carry no length preference and are all kept. In file order."""
    if width < 1:
        raise ValueError(f"length-balance bucket width must be >= 1 character, got {width}")
    buckets: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    keep = []
    for i, r in enumerate(recs):
        d = length_difference(r)
        if d == 0 or r["label"] == 0.5:
            keep.append(i)
            continue
        longer = (d > 0) == (r["label"] > 0.5)
        buckets[abs(d) // width][longer].append(i)
    rng = random.Random(seed)
    for _, (shorter, longer) in sorted(buckets.items()):
        n = min(len(shorter), len(longer))
        keep += rng.sample(shorter, n) + rng.sample(longer, n)
    return sorted(keep)
