"""The instruction-following checks (rlcd.constraints), each by hand on a response that meets it and one that
does not, and the prompt-level rate in eval.py compare."""
import pytest

from rlcd import constraints
from rlcd.constraints import CHECKS, check, followed


def c(cid, **kwargs):
    return {"id": cid, "kwargs": kwargs}


CASES = [   # (constraint, a response that meets it, one that does not)
    (c("punctuation:no_comma"), "No commas here.", "One, two."),
    (c("change_case:english_lowercase"), "all lower case.", "Not all lower."),
    (c("change_case:english_capital"), "ALL CAPS, 2 TIMES.", "ALL CAPS but one."),
    (c("change_case:capital_word_frequency", capital_frequency=2, capital_relation="at least"),
     "THE END is NEAR", "The END is near"),
    (c("change_case:capital_word_frequency", capital_frequency=2, capital_relation="less than"),
     "The END is near", "THE END is NEAR"),
    (c("startend:quotation"), '"Quoted all the way."', '"Quoted" but not all.'),
    (c("startend:end_checker", end_phrase="Is there anything else I can help with?"),
     "Done. Is there anything else I can help with?", "Is there anything else I can help with? Done."),
    (c("keywords:existence", keywords=["dog", "Day"]), "A dog's day.", "A dog's night."),
    (c("keywords:forbidden_words", forbidden_words=["damn"]), "Damnation is a word.", "Damn it."),
    (c("keywords:frequency", keyword="knot", frequency=2, relation="at least"), "Knot, knot.", "One knot."),
    (c("keywords:frequency", keyword="knot", frequency=2, relation="less than"), "One knot.", "Knot, knot."),
    (c("keywords:letter_frequency", letter="z", let_frequency=3, let_relation="at least"), "Zzz.", "Zz."),
    (c("length_constraints:number_words", num_words=4, relation="less than"), "Three short words.", "Four words are here."),
    (c("length_constraints:number_words", num_words=4, relation="at least"), "Four words are here.", "Three short words."),
    (c("length_constraints:number_sentences", num_sentences=2, relation="less than"), "One sentence, 3.5 long.",
     "One. Two!"),
    (c("length_constraints:number_paragraphs", num_paragraphs=2), "First.\n***\nSecond.", "First.\n***\n***\nSecond."),
    (c("detectable_format:title"), "<<A Title>>\nText.", "<< >> Text."),
    (c("detectable_format:number_highlighted_sections", num_highlights=2), "*one* and **two**", "*one* and ** **"),
    (c("detectable_format:number_bullet_lists", num_bullets=2), "* a\n* b", "* a\n* b\n- c"),
    (c("detectable_format:json_format"), '```json\n{"a": 1}\n```', '{"a": 1'),
    (c("detectable_format:constrained_response"), "My answer is maybe.", "Maybe."),
    (c("detectable_format:multiple_sections", section_spliter="SECTION", num_sections=2),
     "SECTION 1\nA.\nSECTION 2\nB.", "SECTION 1\nA and B."),
    (c("detectable_content:postscript", postscript_marker="P.S."), "Hi.\nP.S. Bye.", "Hi. PS bye."),
    (c("detectable_content:postscript", postscript_marker="P.P.S"), "Hi.\nP.P.S Bye.", "Hi.\nP.S. Bye."),
    (c("detectable_content:number_placeholders", num_placeholders=2), "[name] at [address]", "[name] at home"),
    (c("combination:repeat_prompt", prompt_to_repeat="Say hi."), "say hi. Hi!", "Hi! Say hi."),
    (c("combination:two_responses"), "Yes.\n******\nNo.", "Yes.\n******\nYes."),
]


@pytest.mark.parametrize("constraint,meets,breaks", CASES, ids=[f"{x[0]['id']}-{i}" for i, x in enumerate(CASES)])
def test_each_check_by_hand(constraint, meets, breaks):
    assert check(constraint, meets) is True
    assert check(constraint, breaks) is False


def test_every_check_has_a_case_and_unknown_ids_are_not_checked():
    assert {x[0]["id"] for x in CASES} == set(CHECKS)
    assert check(c("language:response_language", language="de"), "Hallo.") is None


def test_a_prompt_follows_when_every_checkable_constraint_is_met():
    both = [c("punctuation:no_comma"), c("change_case:english_lowercase"), c("language:response_language", language="fr")]
    assert followed(both, "no commas and lower case") == 1.0
    assert followed(both, "no commas but Upper") == 0.0
    assert followed([c("language:response_language", language="fr")], "bonjour") is None


def test_compare_reports_instruction_following_against_the_baseline(monkeypatch):
    from rlcd.evaluate import constraint_stats
    cons = {"a": [c("punctuation:no_comma")], "b": [c("punctuation:no_comma")], "c": [c("language:response_language")]}
    by_policy = {"base": {"a": {"response": "x, y"}, "b": {"response": "x y"}, "c": {"response": "z"}},
                 "rlcd": {"a": {"response": "x y"}, "b": {"response": "x y"}, "c": {"response": "z"}}}
    s = constraint_stats(by_policy, cons, "base", n_boot=200)
    assert s["base"]["n"] == 2 and s["base"]["rate"] == 0.5 and s["rlcd"]["rate"] == 1.0
    assert s["rlcd"]["change"] == 0.5 and s["base"]["change"] == 0.0
    assert constraints.constraints_of("no-such-task") is None


def test_pair_rule_stats_orders_each_label_against_the_rule():
    from rlcd.constraints import pair_rule_stats
    no_comma = [c("punctuation:no_comma")]
    cons = {"a": no_comma, "b": no_comma, "c": no_comma, "d": [c("language:response_language")]}
    recs = [{"id": "a", "chosen": "x y", "rejected": "x, y", "label": 1.0},     # separated, label agrees
            {"id": "b", "chosen": "x y", "rejected": "x, y", "label": 0.2},     # separated, label disagrees
            {"id": "c", "chosen": "x y", "rejected": "x y", "label": 1.0},      # both follow: not separated
            {"id": "d", "chosen": "x, y", "rejected": "x y", "label": 1.0},     # nothing checkable
            {"id": "e", "chosen": "x, y", "rejected": "x y", "label": 1.0}]     # no constraints
    s = pair_rule_stats(recs, cons)
    assert s == {"checked": 3, "follows_chosen": 1.0, "follows_rejected": 1 / 3, "separated": 2, "label_agrees": 0.5}
