"""The contrast check: catches the one-word edits that flip a question's meaning but barely move its embedding.

Sentence embeddings put "Is the clinic open on Sundays?" and "... closed on Sundays?" at cosine 0.9, above
any threshold a paraphrase clears. A semantic cache that serves on similarity alone serves the wrong answer
to these (GPTCache does, 93% of the time on one-word edits). So a candidate above the threshold is served
only if the two texts show no contrast:

- numbers, dates, weekdays and months must agree (as multisets: "2 adults" vs "3 adults" differ);
- negation must agree (the parity of not/no/never/without, and un-/in-/dis-/non- prefixed twins);
- named entities (capitalised or mixed-case words past the first) must agree;
- where the texts are otherwise the same words (a minimal edit), every substituted content word must be a
  near-synonym of its replacement by the embedder's own word vectors ("begin" for "start", not "closed"
  for "open").

Spelling slips (one edit, two for long words) count as the same word, so typos still hit.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_TOKEN = re.compile(r"[£$€]?\d[\d,.:/]*(?:%|[a-z]{1,3}\b)?|[A-Za-z]+(?:['’][A-Za-z]+)?|%")
_CONTRACTIONS = {"n't": "not", "'re": "", "'s": "", "'d": "", "'ll": "", "'m": "", "'ve": ""}
_IRREGULAR_NOT = {"can't": "can", "won't": "will", "shan't": "shall", "cannot": "can"}
NEGATORS = frozenset({"not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor"})
_NUMBER_TEXT = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion first second third fourth fifth sixth seventh eighth ninth tenth half quarter double single twice "
    "once dozen monday tuesday wednesday thursday friday saturday sunday mondays tuesdays wednesdays thursdays "
    "fridays saturdays sundays january february march april may june july august september october november "
    "december today tomorrow yesterday tonight weekend weekends weekday weekdays morning afternoon evening "
    "night midnight noon daily weekly monthly yearly annual annually")
_NUMBER_WORDS = frozenset(_NUMBER_TEXT.split())
_FUNCTION_TEXT = (
    "a an the i me my mine you your yours we our us it its they them their he she his her this that these "
    "those is are was were be been being am do does did done can could would should will shall may might "
    "must have has had to of for in into at by with from about as if so and or but what which who whom whose "
    "when where why how whether there here any some please just also really way get got go going want like "
    "need let tell know hi hello hiya hey um uh er yeah so wondering team thanks thank cheers ok okay quick "
    "question")
_FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())
_NUMBER_VALUES = {w: str(i) for i, w in enumerate(_NUMBER_TEXT.split()[:21])} | {
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "percent": "%", "single": "1", "once": "1",
    "twice": "2", "double": "2", "dozen": "12"}
_UNIT_SUFFIX = re.compile(r"(?<=\d)(?:st|nd|rd|th|s)$")  # 3rd = 3, 1990s = 1990; am/pm and units stay
_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "non-", "anti")


def _words(text: str) -> list[str]:
    out = []
    for raw in _TOKEN.findall(text.replace("’", "'")):
        lower = raw.lower()
        if lower in _IRREGULAR_NOT:
            out += [_IRREGULAR_NOT[lower], "not"]
            continue
        suffix = next((s for s in _CONTRACTIONS if lower.endswith(s) and len(lower) > len(s)), None)
        if suffix is None:
            out.append(raw)
            continue
        out.append(raw[: -len(suffix)])
        if _CONTRACTIONS[suffix]:
            out.append(_CONTRACTIONS[suffix])
    return out


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _is_number(word: str) -> bool:
    return any(c.isdigit() for c in word) or word in _NUMBER_WORDS or word in _NUMBER_VALUES or word == "%"


def _number_key(lower: str) -> str:
    """One spelling per quantity: 'fifty' and '£50' and '50' agree; '7am' and 'seven' agree."""
    if lower in _NUMBER_VALUES:
        return _NUMBER_VALUES[lower]
    if any(c.isdigit() for c in lower):
        return _UNIT_SUFFIX.sub("", lower.strip("£$€.,").replace(",", ""))
    return _stem(lower)


# Words as a parsed sequence holds them (numbers by key, others stemmed) that an edit's content never is.
_NOT_CONTENT = frozenset(map(_number_key, _FUNCTION_WORDS | NEGATORS | _NUMBER_WORDS | frozenset(_NUMBER_VALUES)))


@dataclass(frozen=True)
class _Parsed:
    numbers: Counter  # numbers, dates, weekdays, months, by _number_key
    in_digits: frozenset[str]  # number keys written in digits (explicit quantities, never idiom like "quick one")
    negations: int
    entities: frozenset[str]
    content: tuple[str, ...]  # lower-case stems of content words (numbers and entities excluded)
    sequence: tuple[str, ...]  # every word in order (lower-case stems, numbers by _number_key)


@lru_cache(maxsize=65536)
def _parse(text: str) -> _Parsed:
    numbers, entities, content, sequence, negations, in_digits = Counter(), set(), [], [], 0, set()
    for sentence in re.split(r"[.!?;:,]\s+|\n", text):
        for i, raw in enumerate(_words(sentence)):
            lower = raw.lower()
            key = _number_key(lower)
            sequence.append(key)
            if any(c.isdigit() for c in raw):
                in_digits.add(key)
            if lower in NEGATORS:
                negations += 1
            elif _is_number(lower):
                numbers[key] += 1
            elif lower in _FUNCTION_WORDS:
                continue
            elif (i > 0 and raw[0].isupper() and raw != "I" and not raw.isupper()) or (
                    len(raw) > 1 and raw[1:] != raw[1:].lower() and not raw.isupper()):
                entities.add(lower)
            else:
                content.append(_stem(lower))
    return _Parsed(numbers, frozenset(in_digits), negations, frozenset(entities), tuple(content), tuple(sequence))


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein (adjacent transpositions) distance, or limit + 1 once it must exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _same_word(a: str, b: str) -> bool:
    """Equal, or a spelling slip of each other (one edit; two in words of ten letters or more)."""
    if a == b:
        return True
    limit = 2 if min(len(a), len(b)) >= 10 else 1 if min(len(a), len(b)) >= 4 else 0
    return limit > 0 and a[0] == b[0] and _edit_distance(a, b, limit) <= limit


def _unmatched(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Words of each side with no equal (or misspelled) partner on the other side."""
    rest_b = list(b)
    only_a = []
    for word in a:
        match = next((k for k, other in enumerate(rest_b) if _same_word(word, other)), None)
        if match is None:
            only_a.append(word)
        else:
            rest_b.pop(match)
    return only_a, rest_b


def _minimal_edit(a: tuple[str, ...], b: tuple[str, ...], limit: int) -> tuple[list[str], list[str]] | None:
    """(words removed from a, words added in b) when b is a with at most `limit` words changed on each side
    (spelling slips count as equal), else None."""
    b = tuple(next((x for x in a if _same_word(x, y)), y) for y in b)
    removed, added = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            removed += a[i1:i2]
            added += b[j1:j2]
    if len(removed) > limit or len(added) > limit:
        return None
    return removed, added


def _negated_twin(only_a: list[str], only_b: list[str]) -> bool:
    """'safe' vs 'unsafe', 'agree' vs 'disagree'."""
    for x in only_a:
        for y in only_b:
            short, long = (x, y) if len(x) < len(y) else (y, x)
            if any(long == p + short for p in _NEGATING_PREFIXES):
                return True
    return False


WordVectors = Callable[[list[str]], np.ndarray]  # words -> unit row vectors


@dataclass
class ContrastCheck:
    """`find(cached, new)` names the contrast between two texts, or returns None when there is none.

    `word_vectors` embeds single words for the synonym test of minimal edits; `synonym_similarity` is the
    cosine a substituted word needs with its replacement; `max_substituted` bounds what counts as a minimal
    edit (more changed words than this is a rewording, left to the sentence similarity)."""

    word_vectors: WordVectors
    synonym_similarity: float
    max_substituted: int = 2

    def find(self, cached: str, new: str) -> str | None:
        a, b = _parse(cached), _parse(new)
        only_a_num, only_b_num = a.numbers - b.numbers, b.numbers - a.numbers
        if (only_a_num and only_b_num) or (set(only_a_num) & a.in_digits) or (set(only_b_num) & b.in_digits):
            return "number"  # a quantity or date changed, or an explicit one was added or dropped
        words_a, words_b = a.content + tuple(a.entities), b.content + tuple(b.entities)
        only_a, only_b = _unmatched(words_a, words_b)
        if any(e in only_a for e in a.entities) or any(e in only_b for e in b.entities):
            return "entity"  # a name on one side that the other lacks (case-insensitive, typo-tolerant)
        edit = _minimal_edit(a.sequence, b.sequence, self.max_substituted)
        if edit is None:
            return None  # a rewording: the sentence similarity decides
        removed, added = edit
        pure = not (removed and added)  # only words added, or only words dropped
        if a.negations % 2 != b.negations % 2 or _negated_twin(removed, added):
            return "negation"
        # Function words, negators and numbers (judged above) are not the content an edit changes.
        removed = [w for w in removed if w not in _NOT_CONTENT]
        added = [w for w in added if w not in _NOT_CONTENT]
        if removed and added and not self._synonyms(removed, added):
            return "substitution"
        # A word added (or dropped) in an otherwise equal question narrows or widens it ("my colleague's
        # password", "the extended warranty") unless it only restates the rest ("insurance policy").
        extra, rest = (added, a.content) if added else (removed, b.content)
        if pure and extra and rest and not self._covered(extra, list(rest)):
            return "scope"
        return None

    def _covered(self, words: list[str], others: list[str]) -> bool:
        """Every word has a near-synonym (by word vectors) among the others."""
        vectors = self.word_vectors(words + others)
        sims = vectors[: len(words)] @ vectors[len(words):].T
        return bool(sims.max(axis=1).min() >= self.synonym_similarity)

    def _synonyms(self, only_a: list[str], only_b: list[str]) -> bool:
        """Every substituted word has a near-synonym among its replacements, and the other way round."""
        return self._covered(only_a, only_b) and self._covered(only_b, only_a)
