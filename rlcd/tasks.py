"""Tasks, affixes and the contrastive prompts p+ / p- of RLCD (arXiv 2307.12950, Sec. 3).

RLCD simulates a preference pair by sampling o+ from p+ and o- from p-, two prompts that differ only
by a short affix on the assistant turn ("(harmless, helpful response)" vs "(harmful, unhelpful
response)"), and labels o+ as preferred. The affix strings, the RLAIF scorer instructions and the
insertion rule are those of the official code, facebookresearch/RLCD scripts/simulate_preference_data.py
(HARMLESS_*_AFFIXES, HARMLESS_ANTHROPIC_INSTRUCTIONS, create_prompts, analyze_results).

API
    TASKS: dict[str, Task]          "harmless" (16 pairs), "helpful" (1), "outlines" (3, our own),
                                    "instructions" (3, our own; IFEval's verifiable constraints)
    Task(name, affixes, instructions)   affixes[i] = (p+ affix, p- affix); instructions[i] is the
                                        RLAIF scorer principle aligned with affix pair i
    affix_index(prompt_id, n, seed=0) -> int
        the one affix pair used for a prompt, drawn from a hash of (seed, id): p+ and p- share it
    format_prompt(messages, fmt, tokenizer=None, affix=None, polarity=+1, carrier="header") -> str
        fmt "plain": the paper's dialogue "Human: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:"
        fmt "chat":  tokenizer.apply_chat_template(messages, add_generation_prompt=True) -> str
        affix None = the neutral prompt; affix = (pos, neg) and polarity +1 puts pos on the final
        assistant header and neg on every earlier assistant turn, polarity -1 the reverse.
        carrier (chat only): "header" puts the affix on the assistant header; "system" states it in a
        system message instead (final polarity only).
    contrastive_pair(record, task, fmt, tokenizer=None, seed=0, design=None) -> ContrastivePair   (rlcd.designs)
        ContrastivePair(plus, minus, neutral, index, plus_prefix, minus_prefix), a NamedTuple
    scorer_prompt(prompt_text, instruction, a, b) -> str      the RLAIF labelling prompt, verbatim
    postprocess(text, fmt, require_end=False) -> str | None   clean one sampled response
    clean(result, fmt, tokenizer, require_end) -> (str | None, ended)   postprocess a generate_texts result
    FormatError(ValueError)         a conversation or chat template that cannot carry an affix
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class FormatError(ValueError):
    """The conversation or the tokenizer's chat template cannot be formatted as asked."""


class ChatTokenizer(Protocol):
    """What the "chat" format needs from a tokenizer (models/tokenizer.py provides it)."""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = ...) -> str: ...


@dataclass(frozen=True)
class Task:
    name: str
    affixes: list[tuple[str, str]]  # (p+ affix, p- affix), index-aligned with instructions
    instructions: list[str]  # RLAIF scorer principles

    def __post_init__(self) -> None:
        if len(self.affixes) != len(self.instructions) or not self.affixes:
            raise ValueError(f"{self.name}: need as many scorer instructions as affix pairs")


# Harmlessness: the official code's 16 pairs, verbatim (the paper's Appendix lists the same strings). Note that
# pairs 4 and 15 share the negative affix "(unethical and immoral response)"; that is in the original.
HARMLESS_AFFIXES = [
    ("(helpful, honest, inoffensive response)", "(unhelpful, dishonest, toxic response)"),
    ("(law-abiding, ethical response)", "(illegal, unethical response)"),
    ("(innocent response)", "(prejudiced response)"),
    ("(harmless, helpful response)", "(harmful, unhelpful response)"),
    ("(ethical and moral response)", "(unethical and immoral response)"),
    ("(inoffensive response)", "(offensive response)"),
    ("(correct, conscientious, socially acceptable response)",
     "(incorrect, unconscientious, socially unacceptable response)"),
    ("(simulating a wise, ethical person)", "(simulating a foolish, unethical person)"),
    ("(legal, ethical, moral response)", "(illegal, unethical, immoral response)"),
    ("(age-appropriate, family-friendly response)", "(inappropriate, not-family-friendly response)"),
    ("(thoughtful response)", "(thoughtless response)"),
    ("(politically correct response)", "(racist, sexist, socially biased response)"),
    ("(simulating a very kind person)", "(simulating a really evil person)"),
    ("(harmless, helpful, honest response)", "(harmful, unhelpful, dishonest response)"),
    ("(ethical response)", "(toxic response)"),
    ("(ethically and morally aware response)", "(unethical and immoral response)"),
]
# The 16 Constitutional AI comparison principles (Bai et al. 2022, "Constitutional AI", App. C.2,
# "Principles for RL-CAI"), verbatim from HARMLESS_ANTHROPIC_INSTRUCTIONS in the official RLCD code,
# including its typographic apostrophes (’) and the original's "overly-reactive of accusatory".
# The official code uses principle i to score the pair made with affix pair i (RLCD-Rescore) and a
# random one for RLAIF.
HARMLESS_INSTRUCTIONS = [
    "Please choose the response that is the most helpful, honest, and harmless.",
    "Please choose the assistant response that is as harmless and ethical as possible. Do NOT choose "
    "responses that are toxic, racist, or sexist, or that encourage or support illegal, violent, or "
    "unethical behavior. Above all the assistant’s response should be wise, peaceful, and ethical.",
    "Compare the degree of harmfulness in the assistant responses and choose the one that’s less "
    "harmful. However, try to avoid choosing responses that are too preachy, obnoxious, or "
    "overly-reactive.",
    "Choose the assistant response that is as harmless, helpful, polite, respectful, and thoughtful as "
    "possible without sounding overly-reactive of accusatory.",
    "Please choose the assistant response that’s more ethical and moral. Do NOT choose responses that "
    "exhibit toxicity, racism, sexism or any other form of physical or social harm.",
    "Which of these assistant responses exhibits less harmful and more acceptable behavior? Choose the "
    "less harmful response.",
    "Choose the assistant response that answers the human’s query in a more friendly, amiable, "
    "conscientious, and socially acceptable manner.",
    "Which of these assistant responses is less harmful? Choose the response that a wise, ethical, "
    "polite and friendly person would more likely say.",
    "Choose the response that is less harmful, paying close attention to whether each response "
    "encourages illegal, unethical or immoral activity.",
    "Please consider these assistant responses and choose the one that is less harmful, more "
    "age-appropriate, and more family-friendly.",
    "Choose the response that answers the human in the most thoughtful, respectful and cordial manner.",
    "Compare the assistant responses in terms of toxicity, racism, sexism and social bias, and choose "
    "the less harmful response.",
    "Choose the response that sounds most similar to what a peaceful, ethical, and wise person like "
    "Martin Luther King Jr. or Mahatma Gandhi might say.",
    "Which of the assistant responses is most harmless, helpful, and honest? Choose the best response "
    "based on these criteria.",
    "Choose the assistant response that is more harmless, polite, pleasant, and least likely to offend "
    "a socially-aware audience.",
    "Choose the assistant response that demonstrates more ethical and moral awareness without sounding "
    "excessively condescending, reactive, annoying or condemnatory.",
]
# Helpfulness: one pair and one instruction, verbatim from the official code.
HELPFUL_AFFIXES = [("(giving a helpful response)", "(giving an unhelpful response)")]
HELPFUL_INSTRUCTIONS = ["Please choose the response that is more helpful."]
# Story outlines: the paper targets interestingness, well-formedness and relevance to the premise but
# never published its strings, so these are ours, in the same "(..., ... response)" style; the
# instructions are aligned with them one to one.
OUTLINE_AFFIXES = [
    ("(interesting, creative, surprising outline)", "(boring, predictable, unoriginal outline)"),
    ("(well-structured, coherent outline)", "(badly structured, incoherent outline)"),
    ("(outline that closely follows the premise)", "(outline that ignores the premise)"),
]
OUTLINE_INSTRUCTIONS = [
    "Please choose the story outline that is more interesting, creative and surprising.",
    "Please choose the story outline that is better structured and more coherent, with clear, "
    "well-formed plot points that follow from one another.",
    "Please choose the story outline that is more relevant to the premise and follows it more closely.",
]

# Instruction following (a task outside the paper's three): IFEval's prompts state constraints on format,
# length and wording, so the preferred response is not a direction on one attribute (a constraint may ask
# for more words or fewer, capitals or none) and rlcd.constraints checks it without a judge. Ours, in the
# paper's affix style, aligned one to one with the instructions.
INSTRUCTION_AFFIXES = [
    ("(response that follows every instruction exactly)", "(response that ignores the instructions)"),
    ("(response in exactly the requested format)", "(response in a different format than requested)"),
    ("(careful response that meets every stated constraint)", "(careless response that breaks the stated constraints)"),
]
INSTRUCTION_INSTRUCTIONS = [
    "Please choose the response that follows the human's instructions more exactly, including every "
    "stated constraint on format, length and wording.",
    "Please choose the response whose format is closer to the one the human asked for.",
    "Please choose the response that meets more of the constraints the human stated, such as required or "
    "forbidden words, punctuation, capitalisation, length and structure.",
]

TASKS: dict[str, Task] = {
    "harmless": Task("harmless", HARMLESS_AFFIXES, HARMLESS_INSTRUCTIONS),
    "helpful": Task("helpful", HELPFUL_AFFIXES, HELPFUL_INSTRUCTIONS),
    "outlines": Task("outlines", OUTLINE_AFFIXES, OUTLINE_INSTRUCTIONS),
    "instructions": Task("instructions", INSTRUCTION_AFFIXES, INSTRUCTION_INSTRUCTIONS),
}

FORMATS = ("plain", "chat")
CARRIERS = ("header", "system")


def affix_index(prompt_id: str, n: int, seed: int = 0) -> int:
    """The affix pair of a prompt, uniform over n, fixed by (seed, id).

    The official code draws it with random.choice per prompt; a hash gives the same distribution but
    does not depend on the order prompts are visited in, so a resumed or sharded run agrees with a
    fresh one. For the RLAIF baseline the same index picks the scorer instruction.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return int(hashlib.sha256(f"affix:{seed}:{prompt_id}".encode()).hexdigest()[:16], 16) % n


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise FormatError("empty conversation")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise FormatError(f"bad message {m!r}: need role system/user/assistant and str content")
    if messages[-1]["role"] != "user":
        raise FormatError(f"the conversation must end on a user turn, not {messages[-1]['role']!r}")


def _affixes(affix: tuple[str, str] | None, polarity: int) -> tuple[str | None, str | None]:
    """(affix for the final assistant turn, affix for every earlier one)."""
    if polarity not in (1, -1):
        raise ValueError(f"polarity must be +1 or -1, got {polarity}")
    if affix is None:
        return None, None
    pos, neg = affix
    return (pos, neg) if polarity == 1 else (neg, pos)


# ---------------------------------------------------------------------------------------------
# "plain": the HH-RLHF dialogue of the paper

def _plain(messages: list[dict], final: str | None, earlier: str | None) -> str:
    """Human/Assistant dialogue ending on "\\n\\nAssistant {final}:".

    As in create_prompts() of the official code: the final "Assistant:" gets this prompt's own affix,
    every earlier "Assistant:" the opposite one, so the dialogue history shows the contrasting
    behaviour and the model is steered away from imitating it. The official prompts were .strip()ped,
    so the text starts with "Human:" rather than "\\n\\nHuman:". A system message, which HH-RLHF
    never has, becomes a preamble before the first turn.
    """
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        elif m["role"] == "user":
            parts.append(f"Human: {m['content'].strip()}")
        else:
            marker = "Assistant:" if earlier is None else f"Assistant {earlier}:"
            parts.append(f"{marker} {m['content'].strip()}")
    parts.append("Assistant:" if final is None else f"Assistant {final}:")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# "chat": a tokenizer's chat template

def _render(tokenizer: ChatTokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise FormatError("apply_chat_template must return a str (a Hugging Face tokenizer needs "
                          "tokenize=False)")
    return out


def assistant_header(tokenizer: ChatTokenizer) -> str:
    """The text the template appends for add_generation_prompt=True, e.g. "<|im_start|>assistant\\n".

    Learned by rendering a probe conversation with and without the generation prompt, so any template
    works whose generation prompt is a non-empty suffix (ChatML, Llama-3, Gemma, Zephyr, ...).
    """
    probe = [{"role": "user", "content": "Hello."}]
    bare, gen = _render(tokenizer, probe, False), _render(tokenizer, probe, True)
    header = gen[len(bare):]
    if not gen.startswith(bare) or not header.strip():
        raise FormatError("the chat template has no recognisable assistant header (the generation "
                          "prompt adds nothing): use fmt='plain' or carrier='system'")
    return header


def _mark(header: str, affix: str) -> str:
    """Put the affix into an assistant header, right after the role name: the chat analogue of the
    paper's "Assistant (affix):", e.g. "<|im_start|>assistant (harmless, helpful response)\\n".
    With no "assistant" in the header (Gemma's "model"), it goes before the header's trailing
    whitespace."""
    i = header.lower().rfind("assistant")
    j = i + len("assistant") if i >= 0 else len(header.rstrip())
    return f"{header[:j]} {affix}{header[j:]}"


def _chat_header(tokenizer: ChatTokenizer, messages: list[dict], final: str | None,
                 earlier: str | None) -> str:
    """Render, then rewrite each assistant header: the final one with `final`, earlier ones with
    `earlier` (the official code's rule, carried over from "Assistant:" markers to headers)."""
    text = _render(tokenizer, messages, True)
    if final is None and earlier is None:
        return text
    header = assistant_header(tokenizer)
    if not text.endswith(header):
        raise FormatError(f"the rendered prompt does not end with the assistant header {header!r}")
    body = text[: len(text) - len(header)]
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    pieces = body.split(header)  # an earlier assistant turn sits between each two pieces
    if len(pieces) - 1 != n_assistant:
        raise FormatError(f"found {len(pieces) - 1} assistant headers {header!r} for {n_assistant} "
                          "assistant turns: the template renders earlier turns differently, or a "
                          "message contains the header text")
    old = header if earlier is None else _mark(header, earlier)
    new = header if final is None else _mark(header, final)
    return old.join(pieces) + new


def _chat_system(tokenizer: ChatTokenizer, messages: list[dict], final: str | None) -> str:
    """Carry the affix in a system message instead of the header: "Respond as the assistant (affix)."
    is the paper's "Assistant (affix):" turned into an instruction. It marks the reply to be written
    only; earlier assistant turns are left as they are. An existing system message is extended (it
    replaces the template's default one, if any, in both p+ and p- alike)."""
    if final is None:
        return _render(tokenizer, messages, True)
    note = f"Respond as the assistant {final}."
    if messages[0]["role"] == "system":
        messages = [{"role": "system", "content": f"{messages[0]['content'].strip()}\n\n{note}"},
                    *messages[1:]]
    else:
        messages = [{"role": "system", "content": note}, *messages]
    return _render(tokenizer, messages, True)


def format_prompt(messages: list[dict], fmt: str, tokenizer: ChatTokenizer | None = None,
                  affix: tuple[str, str] | None = None, polarity: int = 1,
                  carrier: str = "header") -> str:
    """The prompt text for one conversation. affix=None gives the neutral prompt p (RLAIF, evaluation,
    PPO); affix=(pos, neg) with polarity +1 gives p+, with -1 gives p-."""
    _check_messages(messages)
    final, earlier = _affixes(affix, polarity)
    if carrier not in CARRIERS:
        raise ValueError(f"carrier must be one of {CARRIERS}, got {carrier!r}")
    if fmt == "plain":
        if carrier != "header":
            raise ValueError("fmt='plain' carries the affix on the 'Assistant:' marker only")
        return _plain(messages, final, earlier)
    if fmt == "chat":
        if tokenizer is None:
            raise ValueError("fmt='chat' needs a tokenizer with apply_chat_template")
        if carrier == "system":
            return _chat_system(tokenizer, messages, final)
        return _chat_header(tokenizer, messages, final, earlier)
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


class ContrastivePair(NamedTuple):
    plus: str  # p+: the positive side of the design (the positive affix on the final assistant turn)
    minus: str  # p-: the negative side
    neutral: str  # p: the conversation alone
    index: int  # the affix pair used (and the aligned scorer instruction)
    plus_prefix: str = ""  # the reply's beginning that ends p+ (a design's prefix), kept in o+
    minus_prefix: str = ""  # the same for p- and o-

    def contexts(self) -> tuple[str, str]:
        """p+ and p- without their reply prefixes: where a whole response, prefix included, is scored
        (rlcd.simulate's rlcd-logprob labels). In plain format the prefix follows a space, cut with it."""
        return tuple(p[:len(p) - len(x)].rstrip(" ") if x else p
                     for p, x in ((self.plus, self.plus_prefix), (self.minus, self.minus_prefix)))


def _side_messages(messages: list[dict], side) -> list[dict]:
    """The conversation as one side of a design shows it: its system message (appended to the
    conversation's own, if any), then its demonstrations as earlier exchanges, then the conversation."""
    msgs, system = list(messages), side.system
    if msgs and msgs[0]["role"] == "system":
        own, msgs = msgs[0]["content"], msgs[1:]
        system = own if system is None else f"{own.strip()}\n\n{system}"
    demos = [m for user, assistant in side.demonstrations
             for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]
    return ([{"role": "system", "content": system}] if system is not None else []) + demos + msgs


def contrastive_pair(record: dict, task: str | Task, fmt: str, tokenizer: ChatTokenizer | None = None,
                     seed: int = 0, design=None) -> ContrastivePair:
    """p+, p- and p for one prompt record (rlcd.prompts schema: "id" and "messages") under a prompt
    design (rlcd.designs; default: the paper's affixes on the assistant header).

    One affix index per prompt, shared by p+ and p- so that the pair differs only in polarity; it is drawn
    over the task's affixes whatever the design's, so that it picks the same scorer instruction.
    """
    from rlcd.designs import DESIGNS

    d = design or DESIGNS["paper-header"]
    t = TASKS[task] if isinstance(task, str) else task
    i = affix_index(record["id"], len(t.affixes), seed)
    pairs = d.affix_pairs(t.affixes)
    affix = pairs[i % len(pairs)] if pairs else None
    msgs = record["messages"]
    _check_messages(msgs)

    def side(s, polarity: int) -> tuple[str, str]:
        text = format_prompt(_side_messages(msgs, s), fmt, tokenizer, affix, polarity, d.carrier)
        if s.prefix is None:
            return text, ""
        return text + (" " if fmt == "plain" else "") + s.prefix, s.prefix
    (plus, plus_prefix), (minus, minus_prefix) = side(d.plus, +1), side(d.minus, -1)
    return ContrastivePair(plus=plus, minus=minus, neutral=format_prompt(msgs, fmt, tokenizer, None, +1),
                           index=i, plus_prefix=plus_prefix, minus_prefix=minus_prefix)


def scorer_prompt(prompt_text: str, instruction: str, a: str, b: str) -> str:
    """The RLAIF labelling prompt of the official code (analyze_results), whitespace and the .strip()
    of every part included. The soft label is P(B) from the next-token logits of "A" and "B"."""
    return ("Consider the following conversation between a human and an assistant:\n\n\n\n"
            + prompt_text.strip() + "\n\n\n\n" + instruction.strip() + "\n\n\n\nOptions:\n\n\n\n(A) "
            + a.strip() + "\n\n\n\n(B) " + b.strip() + "\n\n\n\nThe answer is: (")


# ---------------------------------------------------------------------------------------------
# post-processing of sampled responses

# A turn marker as a model writes it: a role name, optionally with an affix, then a colon. The official
# code checks 'Human:', 'Assistant:', 'User:' and their lower-case forms (scripts/postprocess.py).
_ROLE = r"(?:Human|Assistant|User|human|assistant|user)(?: \([^()\n]*\))?:"
_LEADING_ROLE = re.compile(rf"^\s*{_ROLE}")
# A new turn starts at the beginning of a line. (The official simulation cuts at the first "Human"
# anywhere, which also cuts answers that merely mention humans; requiring a line start avoids that.)
_NEXT_TURN = re.compile(rf"\n\s*{_ROLE}")
# End-of-turn / end-of-text strings of ChatML, GPT-2 style and LLaMA tokenizers, when decoded with
# special tokens kept.
STOP_STRINGS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<end_of_turn>")


def postprocess(text: str, fmt: str, require_end: bool = False) -> str | None:
    """Clean one sampled response, after the official code: drop a leading role marker, cut at the
    next turn (a line starting "Human:", "User:", "Assistant (...):" ...) or at an end-of-turn token,
    strip. None if nothing is left, or if require_end and the response did not end properly.

    "Ended properly" is the paper's keep-filter (simulate_preference_data.process_filter_result keeps
    an output only when the model went on to write the next Human turn): for fmt "plain" a next
    turn marker or an end-of-text token, for fmt "chat" an end-of-turn token (pass the decoded text
    with special tokens). Accepting end-of-text in "plain" is our addition: instruction-tuned
    checkpoints often stop there instead of writing "Human:".
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    text = _LEADING_ROLE.sub("", text, count=1)
    turn = _NEXT_TURN.search(text)
    stop = min((text.find(s) for s in STOP_STRINGS if s in text), default=-1)
    cut = min([i for i in (turn.start() if turn else -1, stop) if i >= 0], default=len(text))
    ended = stop >= 0 or (fmt == "plain" and turn is not None)
    out = text[:cut].strip()
    if not out or (require_end and not ended):
        return None
    return out


def clean(result: dict, fmt: str, tokenizer, require_end: bool) -> tuple[str | None, bool]:
    """(cleaned text or None, ended properly) for one generate_texts result.

    postprocess() looks for end-of-turn strings in the decoded text, but generate_texts drops the stop
    token and decodes without special tokens; so decode again keeping specials (a stray <|endoftext|>
    that is not a stop id then cuts the response too) and put back an end marker when it stopped.
    """
    text = tokenizer.decode(result["token_ids"], skip_special_tokens=False)
    if result["finished"]:
        text += "<|endoftext|>"
    ended = postprocess(text, fmt, require_end=True) is not None
    return postprocess(text, fmt, require_end=require_end), ended
