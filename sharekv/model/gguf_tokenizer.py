"""A `tokenizers.Tokenizer` and a tokenizer_config.json dict from a GGUF file's tokenizer metadata.

Two vocabularies cover the Llama family: `gpt2` (byte-level BPE: tokens + merges) and `llama`
(sentencepiece-style BPE: tokens + scores, with byte fallback, where a merge ranks by its token's score).
"""

from __future__ import annotations

import logging

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from sharekv.model.gguf import GGUFError, GGUFFile

logger = logging.getLogger("sharekv")

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# `tokenizer.ggml.pre` -> the regexes llama.cpp splits text with before byte-level BPE, in order.
PRE_TOKENIZER_SPLITS = {
    "default": [], "gpt-2": [], "gpt2": [],
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one at a time, then GPT-2's split
}

_BYTE_TO_UNICODE: dict[int, str] = {}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters, the alphabet of byte-level vocabularies."""
    if not _BYTE_TO_UNICODE:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        extra = iter(range(256, 512))
        _BYTE_TO_UNICODE.update({b: chr(b if b in printable else next(extra)) for b in range(256)})
    return _BYTE_TO_UNICODE


def _byte_level(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    alphabet = set(byte_to_unicode().values())

    def spell(token: str) -> str:  # a token written in plain text is respelled in the byte alphabet
        return token if set(token) <= alphabet else "".join(byte_to_unicode()[b] for b in token.encode())

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        logger.warning("GGUF pre-tokenizer %r is unknown to sharekv; splitting text as GPT-2 does", pre)
        splits = []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not splits)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits] + [byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, ranked
    by the merged token's score (higher first), then longer left and right pieces, then id order."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token_id, (token, score) in enumerate(zip(tokens, scores, strict=True)):
        if types[token_id] not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), token_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(r[6], r[7]) for r in ranked]


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, sentencepiece_merges(tokens, scores, types), fuse_unk=True,
                                 byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                 prepend_scheme="first" if add_space_prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def tokenizer_from_gguf(file: GGUFFile) -> tuple[HFTokenizer, dict] | None:
    """The file's tokenizer and its tokenizer_config.json, or None if the file carries no vocabulary."""
    kind = file.field("tokenizer.ggml.model")
    tokens = file.field("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return None
    types = file.field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(tokens, file.require("tokenizer.ggml.merges"), file.field("tokenizer.ggml.pre", "default"))
    elif kind == "llama":
        scores = file.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = _sentencepiece(tokens, scores, types, file.field("tokenizer.ggml.add_space_prefix", True))
    else:
        raise GGUFError(f"{file.path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    # Control tokens are special (matched whole, skipped when decoding); user-defined ones are matched
    # whole but kept. A byte-level "control" token spelled outside the byte alphabet is a converter's
    # mislabel that no text can produce, so it is left out as transformers does.
    alphabet = set(byte_to_unicode().values()) if kind == "gpt2" else None
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=True)
                            if ty == CONTROL and (alphabet is None or set(t) <= alphabet)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=True)
                    if ty == USER_DEFINED])

    def token_id(key: str) -> int | None:
        value = file.field(f"tokenizer.ggml.{key}")
        return value if value is not None and 0 <= value < len(tokens) else None

    ids = {name: token_id(f"{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    token = {name: None if i is None else tokens[i] for name, i in ids.items()}
    config = {
        "bos_token": token["bos"],
        "eos_token": token["eos"],
        "unk_token": token["unknown"],
        "pad_token": token["padding"],
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
        "add_bos_token": bool(file.field("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(file.field("tokenizer.ggml.add_eos_token", False)),
        "chat_template": file.field("tokenizer.chat_template"),
        "model_max_length": file.field(f"{file.require('general.architecture')}.context_length"),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    single, special = ["$A"], []
    if config["add_bos_token"] and ids["bos"] is not None:
        single.insert(0, token["bos"])
        special.append((token["bos"], ids["bos"]))
    if config["add_eos_token"] and ids["eos"] is not None:
        single.append(token["eos"])
        special.append((token["eos"], ids["eos"]))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok, {k: v for k, v in config.items() if v is not None}
