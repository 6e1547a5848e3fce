"""Human-labelled pairs from PyRIT's CSVs: the held-out rule (rows hashing to 8-f are dropped before they are
read), the score direction, the disjoint pairing, the cache, and records that the pairs readers accept.
Synthetic CSVs in a synthetic wheel; one network test reads the real pyrit==1.1.0 wheel."""
import csv
import hashlib
import io
import json
import zipfile

import pytest
from conftest import make_tiny_tokenizer

import rlcd.human_pairs as hp
from rlcd.pairs import read_pairs
from rlcd.simulate import REQUIRED


def first_hex(text: str) -> str:
    # Computed here independently of rlcd.human_pairs.allowed.
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[0]


def requests(n: int, keep: bool, stem: str = "How do I do harmful thing") -> list[str]:
    """n request texts that fall in the allowed half (keep) or in the held-out half."""
    out, i = [], 0
    while len(out) < n:
        t = f"{stem} {i}?"
        if (first_hex(t) in "01234567") == keep:
            out.append(t)
        i += 1
    return out


KEEP = requests(4, True)
DROP = requests(3, False)


def csv_bytes(header: list[str], rows: list[list], comment: str | None = "# dataset_version=1.0") -> bytes:
    buf = io.StringIO()
    if comment:
        buf.write(comment + "\n")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


HARM = "pyrit/datasets/scorer_evals/harm/violence.csv"
HARM_MULTI = "pyrit/datasets/scorer_evals/harm/violence_multi_score.csv"
OBJ = "pyrit/datasets/scorer_evals/objective/violence.csv"


def harm_csv():
    h = ["harm_category", "objective", "assistant_response", "human_score_1", "data_type"]
    return csv_bytes(h, [
        ["violence", KEEP[0], "I can't help with that.", 0.0, "text"],
        ["violence", KEEP[0], "Sure, here is how: step 1 ...", 1.0, "text"],
        ["violence", KEEP[0], "Here is a partial answer.", 0.5, "text"],     # gap 0.5 to 0.0: counts
        ["violence", KEEP[1], "Mild answer.", 0.25, "text"],
        ["violence", KEEP[1], "Worse answer.", 0.5, "text"],                  # gap 0.25: no pair
        ["violence", KEEP[2], "an image path", 0.0, "image_path"],             # not text: skipped
        ["violence", KEEP[2], "Refusal, with a # inside.", 0.0, "text"],
        ["violence", KEEP[2], "Detailed harmful answer.", 0.75, "text"],
        # Held-out rows: malformed on purpose (a score that is not a number, a missing column value), so
        # reading them would raise. They must be dropped before anything but the request is looked at.
        ["violence", DROP[0], "Anything.", "not-a-number", "text"],
        ["violence", DROP[0], "Something else.", 1.0, "text"],
        ["violence", DROP[1], "", "", ""],
    ])


def harm_multi_csv():
    h = ["harm_category", "objective", "assistant_response", "human_score_1", "human_score_2", "human_score_3",
         "data_type"]
    return csv_bytes(h, [
        # A duplicate of a violence.csv response (its scores merge: mean over all four ratings).
        ["violence", KEEP[2], "Detailed harmful answer.", 1.0, 1.0, 0.5, "text"],
        ["violence", KEEP[3], "No.", 0.0, 0.25, "", "text"],                 # a blank rater is skipped
        ["violence", KEEP[3], "Yes, and here is more.", 0.75, 1.0, 0.75, "text"],
        ["violence", DROP[2], "x", 7, 7, 7, "text"],                           # out of range: never read
    ])


def objective_csv():
    h = ["objective", "assistant_response", "human_score", "data_type", "harm_category"]
    return csv_bytes(h, [
        # The same request as in harm/: an objective score is another scale, never paired with harm scores.
        [KEEP[1], "Here is exactly what you asked for.", 1, "text", "violence"],
        [KEEP[1], "I won't do that.", 0, "text", "violence"],
        [DROP[0], "Complied.", "True", "text", "violence"],
    ], comment="# dataset_version=1.1")


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "pyrit-1.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(HARM, harm_csv())
        z.writestr(HARM_MULTI, harm_multi_csv())
        z.writestr(OBJ, objective_csv())
        z.writestr("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv", b"objective,assistant_response\n")
    return path


def test_allowed_is_the_first_hex_digit_rule():
    for t in KEEP:
        assert hp.allowed(t) and hp.allowed(f"  {t}\n")         # stripped before hashing
    for t in DROP:
        assert not hp.allowed(t)
    assert hp.allowed("") == (first_hex("") in "01234567")


def test_held_out_rows_are_dropped_before_they_are_read():
    # The DROP rows hold values that would raise if parsed; reading succeeds, and none of them is kept.
    rows = hp.read_csv_rows(HARM, harm_csv()) + hp.read_csv_rows(HARM_MULTI, harm_multi_csv()) \
        + hp.read_csv_rows(OBJ, objective_csv())
    assert rows and all(first_hex(r["request"]) in "01234567" for r in rows)
    assert not {r["request"] for r in rows} & set(DROP)
    # The same malformed value on an allowed row is an error naming the file and line.
    bad = csv_bytes(["objective", "assistant_response", "human_score", "data_type"],
                    [[KEEP[0], "fine", 0, "text"], [KEEP[0], "bad", "not-a-number", "text"]])
    with pytest.raises(hp.HumanPairsError, match=r"violence.csv:4: human_score is 'not-a-number'"):
        hp.read_csv_rows(OBJ, bad)


def test_rows_scores_and_skips():
    rows = hp.read_csv_rows(HARM, harm_csv())
    assert len(rows) == 7                                          # 8 allowed rows, one image row skipped
    assert {r["kind"] for r in rows} == {"harm"}
    assert any("# inside" in r["response"] for r in rows)         # a '#' inside a field is kept
    multi = hp.read_csv_rows(HARM_MULTI, harm_multi_csv())
    no = next(r for r in multi if r["response"] == "No.")
    assert no["score"] == 0.125 and no["n_raters"] == 2           # mean of the two ratings given
    obj = hp.read_csv_rows(OBJ, objective_csv())
    assert sorted(r["score"] for r in obj) == [0.0, 1.0] and {r["kind"] for r in obj} == {"objective"}


def test_pairs_direction_gap_and_kinds(wheel):
    recs = hp.build_pairs(wheel)
    got = {(r["kind"], r["messages"][0]["content"], r["chosen"], r["rejected"]) for r in recs}
    assert got == {
        # KEEP[0]: scores 0, 0.5, 1 -> one disjoint pair, lowest with highest (the 0.5 response is left over)
        ("harm", KEEP[0], "I can't help with that.", "Sure, here is how: step 1 ..."),
        # KEEP[1]: harm scores 0.25 vs 0.5 -> no pair; objective 0 vs 1 -> the refusal is chosen
        ("objective", KEEP[1], "I won't do that.", "Here is exactly what you asked for."),
        # KEEP[2]: 0.0 vs the merged duplicate (0.75 + 1 + 1 + 0.5) / 4 = 0.8125
        ("harm", KEEP[2], "Refusal, with a # inside.", "Detailed harmful answer."),
        # KEEP[3]: 0.125 vs 0.8333
        ("harm", KEEP[3], "No.", "Yes, and here is more."),
    }
    merged = next(r for r in recs if r["messages"][0]["content"] == KEEP[2])
    assert merged["score_rejected"] == pytest.approx((0.75 + 1 + 1 + 0.5) / 4, abs=1e-12)
    assert merged["files"] == ["violence.csv", "violence_multi_score.csv"]
    for r in recs:
        assert r["score_chosen"] + hp.MIN_GAP <= r["score_rejected"] + 1e-9     # lower score is chosen
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
    assert hp.build_pairs(wheel) == recs                                          # deterministic


def test_a_gap_of_exactly_half_counts():
    rows = [{"kind": "harm", "file": "f.csv", "request": KEEP[0], "response": t, "score": s, "n_raters": 1,
             "harm_category": "x"} for t, s in (("a", 0.25), ("b", 0.75))]
    assert len(hp.make_pairs(rows)) == 1
    rows[1]["score"] = 0.7499
    assert hp.make_pairs(rows) == []


def test_match_is_the_largest_disjoint_matching():
    # scores sorted: 0, 0, .25, .5, 1, 1 -> three pairs (0-.5, 0-1, .25-1) exist disjointly
    pairs = hp.match([1.0, 0.0, 0.5, 0.25, 0.0, 1.0])
    assert len(pairs) == 3 and len({i for p in pairs for i in p}) == 6
    s = [1.0, 0.0, 0.5, 0.25, 0.0, 1.0]
    assert all(s[hi] - s[lo] >= 0.5 for lo, hi in pairs)
    assert hp.match([0.0, 0.4, 0.8]) == [(0, 2)]
    assert hp.match([0.3, 0.4, 0.5]) == [] and hp.match([]) == []


def test_make_pairs_refuses_held_out_requests():
    rows = [{"kind": "harm", "file": "f.csv", "request": DROP[0], "response": "a", "score": 0.0, "n_raters": 1,
             "harm_category": "x"}]
    with pytest.raises(hp.HumanPairsError, match="outside the allowed half"):
        hp.make_pairs(rows)


def test_records_are_pairs_records(wheel, tmp_path):
    recs = hp.build_pairs(wheel)
    for r in recs:
        assert all(k in r for k in REQUIRED)
        assert r["task"] == "harmless" and r["label"] == 1.0 and r["licence"] == "MIT"
        assert r["prompt"] == f"Human: {r['messages'][0]['content']}\n\nAssistant:"
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    back = read_pairs(str(f))
    assert [(b["prompt"], b["chosen"], b["format"]) for b in back] == [(r["prompt"], r["chosen"], "plain") for r in recs]
    chat = hp.render(recs, "chat", make_tiny_tokenizer())
    assert chat[0]["format"] == "chat"
    assert chat[0]["prompt"] == f"<|im_start|>user\n{recs[0]['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def test_cache_is_built_once(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("RLCD_HOME", str(tmp_path / "home"))
    calls = []
    monkeypatch.setattr(hp, "fetch_wheel", lambda name, version: calls.append((name, version)) or wheel)
    path = hp.human_pairs_path()
    assert path == tmp_path / "home" / "data" / "human-pairs.jsonl"
    assert hp.human_pairs_path() == path and calls == [("pyrit", "1.1.0")]
    assert hp.load_human_pairs() == hp.build_pairs(wheel)
    meta = json.loads((path.parent / "human-pairs.meta.json").read_text())
    assert meta["pairs"] == 4 and meta["version"] == hp.DATA_VERSION


@pytest.mark.network
def test_real_pyrit_wheel():
    from rlcd.judge import is_refusal

    wheel = hp.fetch_wheel(*hp.PACKAGE)
    rows = hp.read_wheel_rows(wheel)
    assert all(first_hex(r["request"]) in "01234567" for r in rows)
    # The direction: responses that refuse score lower than the others, in both kinds of file.
    for kind in hp.KINDS:
        ref = [r["score"] for r in rows if r["kind"] == kind and is_refusal(r["response"])]
        other = [r["score"] for r in rows if r["kind"] == kind and not is_refusal(r["response"])]
        assert len(ref) >= 10 and sum(ref) / len(ref) + 0.2 < sum(other) / len(other)
    recs = hp.make_pairs(rows)
    # The expected size of the allowed half: ~240 requests, ~150 pairs.
    assert 100 <= len(recs) <= 250
    assert 150 <= len({r["request"] for r in rows}) <= 350
    assert all(hp.allowed(r["messages"][0]["content"]) for r in recs)
