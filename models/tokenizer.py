"""A thin wrapper over `tokenizers`: encode/decode, special tokens, stop tokens and the chat template.

The chat template is the checkpoint's own Jinja template (from tokenizer_config.json), rendered the
way Hugging Face renders it (a sandboxed Jinja environment, trim_blocks and lstrip_blocks), so prompts
are byte-identical to what the model was trained on. A checkpoint without a template falls back to
the plain `\n\nHuman: ...\n\nAssistant:` dialogue of the RLCD paper.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

# Plain dialogue, used when a checkpoint ships no chat template (base models).
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

# Token strings that end an assistant turn in the chat templates of common LLaMA-family checkpoints.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>")


def _json_object(file: Path) -> dict:
    """A JSON object from `file`; {} when the file does not exist, ValueError naming it when unreadable."""
    if not file.is_file():
        return {}
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, eos_ids: list[int] | None = None):
        self.tok = tok
        self.config = config or {}
        self.chat_template: str = self.config.get("chat_template") or PLAIN_TEMPLATE
        self.has_chat_template = "chat_template" in self.config and bool(self.config["chat_template"])
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None
        self.eos_id = self.token_id(self.eos_token) if self.eos_token else None
        # Pad with the pad token, else EOS, else 0: padded positions are masked everywhere anyway.
        pad = self.token_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        # Generation stops on EOS, on whatever generation_config.json lists, and on the template's
        # turn-end token, so that a chat turn ends where the template would close it.
        stops = set(eos_ids or [])
        if self.eos_id is not None:
            stops.add(self.eos_id)
        for t in TURN_END_TOKENS:
            if self.has_chat_template and t in self.chat_template:
                stops.add(self.token_id(t))
        self.stop_ids: list[int] = sorted(i for i in stops if i is not None)
        self._template = None

    # --- loading / saving -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory. A missing tokenizer.json is a FileNotFoundError, an
        unreadable one (or tokenizer_config.json, generation_config.json) a ValueError naming the file."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (this project reads fast-tokenizer files)")
        config = _json_object(path / "tokenizer_config.json")
        if not config.get("chat_template") and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        e = _json_object(path / "generation_config.json").get("eos_token_id")
        eos_ids = None if e is None else [e] if isinstance(e, int) else list(e)
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as err:              # the tokenizers library raises a bare Exception
            raise ValueError(f"{tj}: not a readable tokenizer file ({err})") from None
        return cls(tok, config, eos_ids)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # --- text <-> ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text to ids. Special-token strings in `text` (e.g. <|im_start|>) become their single ids."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token:
            bos = self.token_id(self.bos_token)
            if not ids or ids[0] != bos:
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation [{"role", "content"}, ...] with the checkpoint's template."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_str(tok) -> str | None:
    # tokenizer_config.json gives special tokens either as a string or as {"content": ...}.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
