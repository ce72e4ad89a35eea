"""Tokenizer and incremental committer: streamed text yields exactly the whole text's ids."""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.text import TextCommitter, TextTokenizer, TokenizerError

# Hypothesis examples here tokenize for real; a busy machine must not fail them as too slow.
SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# Characters chosen to hit every branch of the Qwen2 pre-tokenizer regex: letters, digits,
# contractions, punctuation runs, every kind of whitespace run, combining marks (NFC), Hangul
# jamo (compose under NFC), CJK and emoji.
ALPHABET = [
    *list("abcXYZ 019'\"sStTlLdDmMrRvVeE.,!?-\n\r\t"),
    "  ",
    "\n\n",
    " \n",
    "'ll",
    "'re",
    "é",
    "́",
    "̧",
    "ᄀ",
    "ᅡ",
    "ᆨ",
    "日本",
    "語",
    "😀",
    "é",
    "ß",
    "İ",
    "\xa0",
    "...",
    "$5",
    "3.14",
]


# Characters whose long runs used to stay pending, re-split on every append (issue #13): a run
# of spaces or newlines waits for the next non-space, letters (CJK too) and punctuation (emoji
# too) form one growing pre-token, marks wait for the next starter. U+0F73 is class 0 yet NFC
# makes it two marks; digits are one pre-token each.
RUN_CHARS = [
    " ",
    "\n",
    "\t",
    "\r\n",
    " \n",
    "a",
    "Ab",
    "日",
    "1",
    "!",
    ".",
    "😀",
    "'",
    "\u0301",
    "\u0334",
    "\u0f73",
]
RUNS = st.tuples(st.sampled_from(RUN_CHARS), st.integers(min_value=1, max_value=60)).map(
    lambda t: t[0] * t[1]
)


def stream(tok: TextTokenizer, deltas: list[str]) -> list[int]:
    c = TextCommitter(tok)
    out: list[int] = []
    for d in deltas:
        out += c.push(d)
    return out + c.flush()


def whole(tok: TextTokenizer, text: str) -> list[int]:
    return tok.encode(tok.normalize(text).lstrip())


class NaiveCommitter:
    """The committing rule applied from scratch to the whole pending text on every push: the
    specification (and the engine's code before issue #13), quadratic but plainly right."""

    def __init__(self, tok: TextTokenizer):
        self.tok, self.pending, self.started = tok, "", False

    def push(self, delta: str) -> list[int]:
        if not self.started:
            delta = delta.lstrip()
            self.started = bool(delta)
        self.pending = self.tok.normalize(self.pending + delta)
        text = self.pending
        last_starter = len(text) - 1
        while last_starter > 0 and unicodedata.combining(text[last_starter]):
            last_starter -= 1
        last_text = len(text) - 1
        while last_text >= 0 and text[last_text].isspace():
            last_text -= 1
        limit = min(last_starter, last_text)
        cut = max([e for e in self.tok.pretoken_starts(text) if 0 < e <= limit], default=0)
        self.pending = text[cut:]
        return self.tok.encode_before(text, cut) if cut else []

    def flush(self) -> list[int]:
        ids = self.tok.encode(self.pending)
        self.pending, self.started = "", False
        return ids


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def test_known_ids(tokenizer: TextTokenizer) -> None:
    # Ids from the official template (MODEL.md §2.1).
    assert tok_ids(tokenizer, "Hello, world.") == [9707, 11, 1879, 13]
    assert tokenizer.encode("assistant\n") == [77091, 198]
    assert tokenizer.token_to_id("<|im_start|>") == 151644
    assert tokenizer.token_to_id("<tts_pad>") == 151671


def tok_ids(tok: TextTokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_special_token_text_is_spoken_literally(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("say <|im_end|> now")
    assert 151645 not in ids
    assert tokenizer.decode(ids) == "say <|im_end|> now"


def test_commits_only_stable_prefix(tokenizer: TextTokenizer) -> None:
    c = TextCommitter(tokenizer)
    assert c.push("Hel") == []  # the word may go on
    assert c.push("lo, wo") == [9707, 11]  # "Hello" and "," are final once " wo" started
    assert c.pending == " wo"
    # "x\n " would split as x,\n,' ' but "x\n \n" as x,'\n \n': the run must close first.
    c2 = TextCommitter(tokenizer)
    assert c2.push("x\n ") == []
    ids = c2.push("\n") + c2.push("y") + c2.flush()
    assert ids == tokenizer.encode("x\n \ny")


def test_leading_whitespace_dropped_and_flush_starts_new_utterance(tokenizer: TextTokenizer) -> None:
    c = TextCommitter(tokenizer)
    assert c.push("  \n ") == []
    assert c.push("Hi") == []
    assert c.flush() == tokenizer.encode("Hi")
    assert c.push(" again") == []  # a new utterance: its leading space is dropped too
    assert c.flush() == tokenizer.encode("again")


@settings(max_examples=400, deadline=None, suppress_health_check=SLOW_OK)
@given(
    pieces=st.lists(st.sampled_from(ALPHABET), min_size=0, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_any_split_equals_whole_text(tokenizer: TextTokenizer, pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    assert stream(tokenizer, split_at(text, cuts)) == whole(tokenizer, text)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(
    pieces=st.lists(st.one_of(st.sampled_from(ALPHABET), RUNS), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=40),
    by_char=st.booleans(),
)
def test_long_runs_any_split_equals_whole_text(
    tokenizer: TextTokenizer, pieces: list[str], cuts: list[int], by_char: bool
) -> None:
    text = "".join(pieces)
    deltas = list(text) if by_char else split_at(text, cuts)
    assert stream(tokenizer, deltas) == whole(tokenizer, text)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(
    pieces=st.lists(st.one_of(st.sampled_from(ALPHABET), RUNS), min_size=1, max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=60),
    by_char=st.booleans(),
    flush_after=st.integers(min_value=-1, max_value=60),
)
def test_commits_push_by_push_like_the_naive_rule(
    tokenizer: TextTokenizer, pieces: list[str], cuts: list[int], by_char: bool, flush_after: int
) -> None:
    # Not only the same ids in the end: the same ids at the same push, so no commit is late.
    text = "".join(pieces)
    deltas = list(text) if by_char else split_at(text, cuts)
    fast, naive = TextCommitter(tokenizer), NaiveCommitter(tokenizer)
    for i, d in enumerate(deltas):
        assert fast.push(d) == naive.push(d), (i, d)
        assert fast.pending == naive.pending
        assert fast.has_pending == bool(naive.pending)
        if i == flush_after:
            assert fast.flush() == naive.flush()
    assert fast.flush() == naive.flush()


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(text=st.text(min_size=0, max_size=60))
def test_any_unicode_char_by_char(tokenizer: TextTokenizer, text: str) -> None:
    assert stream(tokenizer, list(text)) == whole(tokenizer, text)


def test_long_llm_like_text_random_splits(tokenizer: TextTokenizer) -> None:
    text = (
        "Sure! Here's the plan:\n\n1. Book the 9:30 flight (it's $240).\n2. Don't forget—really—"
        "the café's Wi-Fi password: «hunter2».\n\n  Thanks,\n   Ana 😀 日本語のテキストも。"
    )
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(tokenizer, deltas) == whole(tokenizer, text)


@pytest.mark.parametrize(
    ("rewrite", "text"),
    [
        ((" \u0300", "\u0301\u0300"), "a \u0300b c"),  # the tail's starter becomes a mark
        (("~ ", "  "), "a~ b~  c"),  # the tail's only text becomes a space
    ],
)
def test_tail_that_renormalizes_oddly_is_rescanned(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch, rewrite: tuple[str, str], text: str
) -> None:
    # NFC never does either (checked over all of Unicode), but the committer's bookkeeping
    # must not depend on the normalizer being that tame: it rescans and stays exact.
    nfc = tokenizer.normalize
    monkeypatch.setattr(tokenizer, "normalize", lambda s: nfc(s).replace(*rewrite))
    fast, naive = TextCommitter(tokenizer), NaiveCommitter(tokenizer)
    for ch in text:
        assert fast.push(ch) == naive.push(ch)
        assert fast.pending == naive.pending
    assert fast.flush() == naive.flush()


N_APPENDS = 4096
ONE_CHAR_APPENDS = {
    "spaces": ["Hi"] + [" "] * N_APPENDS,
    "newlines": ["Hi"] + ["\n"] * N_APPENDS,
    "letters": ["a"] * N_APPENDS,
    "cjk": ["日"] * N_APPENDS,
    "digits": ["7"] * N_APPENDS,
    "punctuation": ["!"] * N_APPENDS,
    "emoji": ["😀"] * N_APPENDS,
    "marks": ["x"] + ["\u0334"] * N_APPENDS,
    "composing marks": ["a", "\u0301"] * (N_APPENDS // 2),
    "letters then spaces": ["a"] * (N_APPENDS // 2) + [" "] * (N_APPENDS // 2) + ["b"],
    "prose": list(("It's 9:30, and I'd like 2 coffees—really!\n  Thanks. " * 100)[:N_APPENDS]),
    "mixed": [random.Random(13).choice("ab 1.!\n\u0301日😀'") for _ in range(N_APPENDS)],
}


@pytest.mark.parametrize("name", list(ONE_CHAR_APPENDS))
def test_one_character_appends_cost_linear_work(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Issue #13 item 7: 16,384 one-space appends took 27 s of CPU, because every append
    # re-normalized, re-split and re-encoded all the pending text. Counted, not timed: the
    # characters handed to the tokenizer over N appends must stay within a constant times N
    # (the old code handed it about N^2/2 for every run).
    deltas = ONE_CHAR_APPENDS[name]
    handled = count_text_handled(tokenizer, monkeypatch)
    ids = stream(tokenizer, deltas)
    assert handled() <= 16 * len(deltas)
    monkeypatch.undo()
    assert ids == whole(tokenizer, "".join(deltas))


def count_text_handled(tok: TextTokenizer, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the characters passed to every text method of `tok` from now on."""
    total = [0]

    def counting(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(text: str, *args: Any) -> Any:
            total[0] += len(text)
            return method(text, *args)

        return call

    for name in ("normalize", "pretoken_starts", "encode", "encode_before"):
        monkeypatch.setattr(tok, name, counting(getattr(tok, name)))
    return lambda: total[0]


def test_missing_tokenizer_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer.json and no vocab.json \+ merges.txt"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=r"cannot read vocab\.json/merges\.txt"):
        TextTokenizer.from_dir(tmp_path)
