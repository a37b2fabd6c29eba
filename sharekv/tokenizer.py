"""Tokenizer of a Hugging Face model directory (`tokenizer.json`, `tokenizer_config.json`) and its chat template."""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value: str | dict | None) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    """A `tokenizers` backend with the settings of its tokenizer_config.json (special tokens, chat template)."""

    def __init__(self, backend: HFTokenizer, config: dict) -> None:
        self.backend = backend
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"),
                                      self.chat_template[0]["template"])
        self._compiled = None

    @classmethod
    def from_dir(cls, model_dir: str) -> Tokenizer | None:
        """The directory's tokenizer, or None if it ships none (the model is then driven by token ids)."""
        if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            return None
        config = {}
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        template_file = os.path.join(model_dir, "chat_template.jinja")
        if config.get("chat_template") is None and os.path.isfile(template_file):
            with open(template_file) as f:
                config["chat_template"] = f.read()
        return cls(HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **extra) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError("this model has no chat template; "
                                    "use the completions form with a plain prompt")
        if chat_template is None:
            if self._compiled is None:
                self._compiled = _compile(template)
            compiled = self._compiled
        else:
            compiled = _compile(template)
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Text of a growing token list, produced a token at a time.

    Decoding a window that starts a few tokens back keeps word-boundary spaces right, and text that ends
    in an incomplete UTF-8 character is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 5, 0)

    def step(self, token_ids: list[int]) -> str:
        """The new text once `token_ids` (prompt + output so far) has grown by one or more tokens."""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(token_ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(token_ids)
            return full[len(prefix):]
        return ""
