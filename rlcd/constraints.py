"""Verifiable instructions: which of a prompt's stated constraints a response meets, checked by rule.

The `instructions` task's prompts (IFEval, Zhou et al. 2023, arXiv 2311.07911) each carry constraints that
a program can check ("do not use any commas", "wrap your entire response in double quotation marks",
"answer in fewer than 50 words"), so a policy's instruction following is measured without a judge. A
constraint is {"id": "punctuation:no_comma", "kwargs": {...}} with IFEval's instruction ids and argument
names. The checks below are written from IFEval's definitions (its strict variant: the response as
written, no stripping of markdown or of a first or last line); where a definition needs a library this
project does not use (language identification) or a sentence splitter, the check is None (not checked)
or the approximation is stated beside it.

API
    CHECKS: dict[str, Callable[[str, ...], bool]]     instruction id -> check(response, **kwargs)
    check(constraint, response) -> bool | None          None when the id has no check here
    followed(constraints, response) -> float | None     1.0 when every checkable constraint is met, 0.0 when
                                                        one is not, None when none is checkable (IFEval's
                                                        prompt-level accuracy)
    constraints_of(task) -> dict[id, list] | None       the built-in task's constraints by prompt id (None:
                                                        a task not in VERIFIABLE_TASKS)
"""
from __future__ import annotations

import json
import re
from typing import Callable

WORD = re.compile(r"\w+")
# A sentence ends at . ! or ? followed by white space or the end (an approximation of IFEval's splitter,
# which also knows abbreviations such as "Mr." and "e.g.").
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _relation(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation must be 'less than' or 'at least', got {relation!r}")


def _sentences(text: str) -> int:
    parts = SENTENCE_END.split(text.strip())
    return sum(bool(WORD.search(p)) for p in parts)


def _paragraphs(text: str) -> list[str] | None:
    """Paragraphs separated by the markdown divider ***; None when one of them is empty (IFEval's rule)."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    inner = parts[1:-1]
    if any(not p.strip() for p in inner):
        return None
    return [p for p in parts if p.strip()]


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip().lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _json(text: str) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|Json|JSON)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body).strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _two_responses(text: str) -> bool:
    parts = [p.strip() for p in text.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def _bullets(text: str) -> int:
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def _highlights(text: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def _sections(text: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= num_sections


def _capital_words(text: str) -> int:
    return sum(w.isupper() for w in WORD.findall(text))


CHECKS: dict[str, Callable[..., bool]] = {
    "punctuation:no_comma": lambda r: "," not in r,
    "change_case:english_lowercase": lambda r: r == r.lower() and any(c.isalpha() for c in r),
    "change_case:english_capital": lambda r: r == r.upper() and any(c.isalpha() for c in r),
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation:
        _relation(_capital_words(r), capital_relation, capital_frequency),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "startend:end_checker": lambda r, end_phrase:
        r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "keywords:existence": lambda r, keywords: all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in keywords),
    "keywords:forbidden_words": lambda r, forbidden_words:
        not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    "keywords:frequency": lambda r, keyword, frequency, relation:
        _relation(len(re.findall(re.escape(keyword), r, flags=re.IGNORECASE)), relation, frequency),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation:
        _relation(r.lower().count(letter.lower()), let_relation, let_frequency),
    "length_constraints:number_words": lambda r, num_words, relation: _relation(len(WORD.findall(r)), relation, num_words),
    "length_constraints:number_sentences": lambda r, num_sentences, relation:
        _relation(_sentences(r), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda r, num_paragraphs:
        (p := _paragraphs(r)) is not None and len(p) == num_paragraphs,
    "detectable_format:title": lambda r: any(t.strip() for t in re.findall(r"<<([^\n]+)>>", r)),
    "detectable_format:number_highlighted_sections": lambda r, num_highlights: _highlights(r) >= num_highlights,
    "detectable_format:number_bullet_lists": lambda r, num_bullets: _bullets(r) == num_bullets,
    "detectable_format:json_format": _json,
    "detectable_format:constrained_response": lambda r: any(o in r for o in CONSTRAINED_OPTIONS),
    "detectable_format:multiple_sections": _sections,
    "detectable_content:postscript": _postscript,
    "detectable_content:number_placeholders": lambda r, num_placeholders:
        len(re.findall(r"\[.*?\]", r)) >= num_placeholders,
    "combination:repeat_prompt": lambda r, prompt_to_repeat:
        r.strip().lower().startswith(prompt_to_repeat.strip().lower()),
    "combination:two_responses": _two_responses,
    # Not checked here: language:response_language (needs language identification) and
    # length_constraints:nth_paragraph_first_word.
}


def check(constraint: dict, response: str) -> bool | None:
    """Whether `response` meets one constraint {"id", "kwargs"}; None when the id has no check here."""
    fn = CHECKS.get(constraint["id"])
    if fn is None:
        return None
    kwargs = {k: v for k, v in (constraint.get("kwargs") or {}).items() if v is not None}
    return bool(fn(response, **kwargs))


def followed(constraints: list[dict], response: str) -> float | None:
    """1.0 when every checkable constraint of a prompt is met, 0.0 when any is not, None when none is
    checkable."""
    results = [c for c in (check(x, response) for x in constraints) if c is not None]
    return float(all(results)) if results else None


def pair_rule_stats(records: list[dict], constraints: dict[str, list[dict]]) -> dict:
    """How a pairs file's labels stand against the rule, over the pairs whose prompt has a checkable
    constraint: the share of chosen and of rejected responses that follow; of the pairs the rule separates
    (exactly one side follows) and the label orders (not 0.5), how many, and the share where the label
    prefers the side that follows."""
    both = [(followed(c, r["chosen"]), followed(c, r["rejected"]), float(r["label"]))
            for r in records if (c := constraints.get(r["id"]))]
    both = [b for b in both if b[0] is not None]
    split = [(a > b) == (y > 0.5) for a, b, y in both if a != b and y != 0.5]
    mean = lambda xs: sum(xs) / len(xs) if xs else None                    # noqa: E731
    return {"checked": len(both), "follows_chosen": mean([a for a, _, _ in both]),
            "follows_rejected": mean([b for _, b, _ in both]), "separated": len(split),
            "label_agrees": mean([float(x) for x in split])}


# The built-in tasks whose prompts carry constraints (rlcd.prompts reads them from the data).
VERIFIABLE_TASKS = ("instructions",)


def constraints_of(task: str) -> dict[str, list[dict]] | None:
    """{prompt id: its constraints} of a built-in task whose prompts carry them (all splits), else None."""
    from rlcd.prompts import load_prompts
    if task not in VERIFIABLE_TASKS:
        return None
    return {r["id"]: r["constraints"] for r in load_prompts(task, split=None) if r.get("constraints")}
