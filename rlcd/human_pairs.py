"""Human-labelled harmlessness pairs from PyRIT's scorer-evaluation data (for judges and preference models).

PyRIT (Microsoft, MIT licence) ships the CSVs it validates its own scorers on: assistant responses to
harmful requests, each scored by people. The `pyrit==1.1.0` wheel is fetched with models.hub.fetch_wheel
(pip download --no-deps, never installed) and read with zipfile:

    pyrit/datasets/scorer_evals/harm/*.csv        harm_category, objective, assistant_response,
                                                  human_score[_1.._3], data_type
        human_score: harm severity on the category's 1-5 Likert scale (pyrit/datasets/harm_definition/
        <category>.yaml: 1 = "no depictions or references to violence" ... 5 = "extreme or gratuitous"),
        normalised to 0-1; several raters in the *_multi_score files (we take their mean).
    pyrit/datasets/scorer_evals/objective/*.csv   objective, assistant_response, human_score, data_type,
                                                  harm_category
        human_score: 1 if the response achieves the (harmful) objective, i.e. complies, 0 if not
        (pyrit/score/scorer_evaluation/human_labeled_dataset.py: "0 for not meeting the objective, 1 for
        meeting the objective").
    Not used: scorer_evals/refusal_scorer and sample/ (refusal labels, not harm).

In both kinds a HIGHER score is the MORE harmful response, so the lower-scored response of a pair is
"chosen". Checked on the allowed half: responses that open with a refusal phrase score lower than the
others: mean score 0.09 (52 rows) vs 0.50 (500 rows) in harm/, 0.02 (44) vs 0.57 (150) in objective/
(the refusal phrase list of rlcd.evaluate; tests/test_human_pairs.py repeats the check on the wheel).

Counts (allowed half, pyrit 1.1.0): 746 text rows, 257 distinct requests (374 (kind, request) groups),
156 pairs (136 harm, 20 objective) from 59 groups.

Pairs. Rows are grouped by (kind, request): a harm score and an objective score are different scales,
so they are never compared with each other. Within a group, duplicate responses (the same text in
several files, e.g. hate_speech.csv and hate_speech_multi_score.csv) are merged, averaging their scores.
Two responses whose scores differ by at least MIN_GAP make a pair, the lower-scored one chosen; each
response is used at most once, and as many pairs are made per request as that allows (`match`).

THE HELD-OUT RULE. Only requests whose sha256 of the UTF-8 request text (the `objective` column,
stripped) begins with a hex digit 0-7 are used (`allowed`). The other half is this project's held-out
acceptance set: a row failing the test is discarded as the very first thing done with it, before its
response or scores are read, and is never counted, printed or stored.

API
    allowed(request) -> bool                    the held-out rule
    read_csv_rows(name, data) -> list[dict]     the allowed rows of one CSV file's bytes
    make_pairs(rows, min_gap=MIN_GAP) -> list[dict]   pairs records (schema below)
    build_pairs(wheel=None) -> list[dict]       every pair from the wheel (fetched if not given)
    human_pairs_path() -> Path                  $RLCD_HOME/data/human-pairs.jsonl, built once and cached
    load_human_pairs() -> list[dict]            its records
    render(records, fmt, tokenizer=None) -> list[dict]   the same pairs with "prompt"/"format" for fmt

Record (the pairs-file schema of rlcd/simulate.py, so rlcd.pairs.read_pairs and the judge read it as is):
    id, task="harmless", method="human", format="plain", messages=[{"role": "user", "content": request}],
    prompt ("Human: <request>\\n\\nAssistant:", the paper's plain dialogue), chosen, rejected, label=1.0,
    affix_index=0, p_plus=None, p_minus=None, settings={"min_gap"}, model=None, seed=None, plus
    kind ("harm" | "objective"), harm_category, score_chosen, score_rejected, files, source, licence.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import zipfile
from itertools import combinations
from pathlib import Path

from models.hub import fetch_wheel, rlcd_home
from rlcd.jsonl import write_atomic
from rlcd.tasks import format_prompt

PACKAGE = ("pyrit", "1.1.0")
KINDS = {"harm": "pyrit/datasets/scorer_evals/harm/", "objective": "pyrit/datasets/scorer_evals/objective/"}
MIN_GAP = 0.5              # two responses make a pair when their human scores differ by at least this
LICENCE = "MIT"
SOURCE = "PyRIT scorer_evals (pyrit==1.1.0, github.com/Azure/PyRIT), human scores"
# Bump when the records change (rule, fields, rendering): an older cache is rebuilt, not reused.
DATA_VERSION = 1
FILE_NAME = "human-pairs.jsonl"


class HumanPairsError(ValueError):
    """The PyRIT data is not what this module expects; the message names the file (and line)."""


def allowed(request: str) -> bool:
    """The held-out rule: True iff sha256(request.strip() as UTF-8) starts with a hex digit 0-7."""
    return hashlib.sha256(request.strip().encode("utf-8")).hexdigest()[0] in "01234567"


def _decode(data: bytes) -> str:
    # PyRIT reads these files as UTF-8 and falls back to latin-1 (human_labeled_dataset.from_csv).
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_csv_rows(name: str, data: bytes) -> list[dict]:
    """The allowed text rows of one scorer-evaluation CSV: {kind, file, request, response, score, harm_category}.

    A first line starting with "#" is PyRIT's version comment and is skipped (PyRIT's own reader passes
    comment="#" to pandas, which would also cut any "#" inside a response; the csv module does not).
    The request's hash is tested before anything else is read from the row.
    """
    kind = next((k for k, d in KINDS.items() if name.startswith(d)), None)
    if kind is None:
        raise HumanPairsError(f"{name}: not under {' or '.join(KINDS.values())}")
    text = _decode(data)
    lines = text.splitlines(keepends=True)
    skip = 1 if lines and lines[0].lstrip().startswith("#") else 0
    reader = csv.DictReader(io.StringIO("".join(lines[skip:])))
    header = reader.fieldnames or []
    score_cols = [c for c in header if c.strip().startswith("human_score")]
    for col in ("objective", "assistant_response"):
        if col not in header:
            raise HumanPairsError(f"{name}: no {col!r} column (header {header})")
    if not score_cols:
        raise HumanPairsError(f"{name}: no human_score column (header {header})")
    rows = []
    for row in reader:
        request = (row.get("objective") or "").strip()
        if not allowed(request):          # the held-out half: dropped before anything else is read
            continue
        if not request:
            continue
        lineno = reader.line_num + skip
        if (row.get("data_type") or "text").strip() != "text":
            continue                          # images, audio: nothing a text judge can read
        response = (row.get("assistant_response") or "").strip()
        if not response:
            continue
        scores = []
        for c in score_cols:
            v = (row.get(c) or "").strip()
            if not v:
                continue                      # a rater who left this row blank
            try:
                s = float({"true": "1", "false": "0"}.get(v.lower(), v))
            except ValueError:
                raise HumanPairsError(f"{name}:{lineno}: {c} is {v!r}, not a number") from None
            if not 0.0 <= s <= 1.0:
                raise HumanPairsError(f"{name}:{lineno}: {c} is {s}, outside [0, 1]")
            scores.append(s)
        if not scores:
            continue
        rows.append({"kind": kind, "file": name.rsplit("/", 1)[-1], "request": request, "response": response,
                     "score": sum(scores) / len(scores), "n_raters": len(scores),
                     "harm_category": (row.get("harm_category") or "").strip()})
    return rows


def _pair_id(kind: str, request: str, chosen: str, rejected: str) -> str:
    h = hashlib.sha256("\x00".join(("human", kind, request, chosen, rejected)).encode("utf-8")).hexdigest()
    return f"human-{h[:12]}"


def match(scores: list[float], min_gap: float = MIN_GAP) -> list[tuple[int, int]]:
    """The largest set of disjoint (low, high) index pairs with scores[high] - scores[low] >= min_gap.

    With the scores sorted, the k lowest matched in order with the k highest is feasible iff any
    k-matching is (an exchange argument), so the largest feasible k is found by trying k = n//2 down.
    Ties are broken by the caller's order (sorted is stable).
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    n = len(order)
    # Scores are means of k/4 ratings or 0/1, compared in float64: a gap of exactly 0.5 must count.
    eps = 1e-9
    for k in range(n // 2, 0, -1):
        if all(scores[order[n - k + i]] - scores[order[i]] >= min_gap - eps for i in range(k)):
            return [(order[i], order[n - k + i]) for i in range(k)]
    return []


def make_pairs(rows: list[dict], min_gap: float = MIN_GAP) -> list[dict]:
    """Pairs records from allowed rows (see the module docstring); sorted by id, so stable.

    Each response is used in at most one pair (`match`): a request with 50 responses would otherwise
    give hundreds of overlapping pairs and outweigh every other request. The rows are checked against
    the held-out rule again, so a caller cannot feed this function the other half by mistake.
    """
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if not allowed(r["request"]):
            raise HumanPairsError("make_pairs was given a request outside the allowed half")
        g = groups.setdefault((r["kind"], r["request"]), {})
        # Merge duplicate responses (whitespace-normalised): the mean over every rater of every copy.
        key = " ".join(r["response"].split())
        d = g.setdefault(key, {"response": r["response"], "sum": 0.0, "n": 0, "files": set(),
                               "harm_category": r["harm_category"]})
        d["sum"] += r["score"] * r["n_raters"]
        d["n"] += r["n_raters"]
        d["files"].add(r["file"])
    out = []
    for (kind, request), responses in groups.items():
        messages = [{"role": "user", "content": request}]
        items = sorted(responses.values(), key=lambda d: d["response"])
        scores = [d["sum"] / d["n"] for d in items]
        for i, j in match(scores, min_gap):
            lo, hi = items[i], items[j]                  # lower score = less harmful = chosen
            out.append({
                "id": _pair_id(kind, request, lo["response"], hi["response"]), "task": "harmless",
                "method": "human", "format": "plain", "messages": messages,
                "prompt": format_prompt(messages, "plain"),
                "chosen": lo["response"], "rejected": hi["response"], "label": 1.0,
                "affix_index": 0, "p_plus": None, "p_minus": None, "settings": {"min_gap": min_gap},
                "model": None, "seed": None, "kind": kind,
                "harm_category": lo["harm_category"] or hi["harm_category"],
                "score_chosen": scores[i], "score_rejected": scores[j],
                "files": sorted(lo["files"] | hi["files"]), "source": SOURCE, "licence": LICENCE,
            })
    return sorted(out, key=lambda r: r["id"])


def read_wheel_rows(wheel: str | Path) -> list[dict]:
    """The allowed rows of every harm/ and objective/ CSV in a pyrit wheel."""
    rows = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".csv") and any(n.startswith(d) for d in KINDS.values()))
        if not names:
            raise HumanPairsError(f"{wheel}: no CSV under {' or '.join(KINDS.values())}")
        for n in names:
            rows += read_csv_rows(n, z.read(n))
    return rows


def build_pairs(wheel: str | Path | None = None) -> list[dict]:
    """Every human pair (allowed half only) from the pyrit wheel; fetched from PyPI when not given."""
    return make_pairs(read_wheel_rows(wheel or fetch_wheel(*PACKAGE)))


def human_pairs_path() -> Path:
    """$RLCD_HOME/data/human-pairs.jsonl, built on first use (atomically) and rebuilt if its version is old."""
    data = rlcd_home() / "data"
    path, meta = data / FILE_NAME, data / (FILE_NAME.removesuffix(".jsonl") + ".meta.json")
    if path.exists() and meta.exists():
        try:
            if json.loads(meta.read_text())["version"] == DATA_VERSION:
                return path
        except (ValueError, KeyError):
            pass
    records = build_pairs()
    data.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    meta.write_text(json.dumps({"version": DATA_VERSION, "pairs": len(records),
                                "requests": len({(r["kind"], r["messages"][0]["content"]) for r in records}),
                                "package": "==".join(PACKAGE), "min_gap": MIN_GAP}))
    return path


def load_human_pairs() -> list[dict]:
    path = human_pairs_path()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def render(records: list[dict], fmt: str, tokenizer=None) -> list[dict]:
    """Copies of pairs records whose "prompt" is the neutral prompt in `fmt` ("plain", or "chat" through
    `tokenizer`'s template), for a preference model trained on that format."""
    return [{**r, "format": fmt, "prompt": format_prompt(r["messages"], fmt, tokenizer)} for r in records]


if __name__ == "__main__":
    recs = load_human_pairs()
    print(f"{human_pairs_path()}: {len(recs)} pairs over "
          f"{len({(r['kind'], r['messages'][0]['content']) for r in recs})} requests", file=sys.stderr)
