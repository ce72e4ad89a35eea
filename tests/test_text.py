"""Tokenizer and incremental committer: streamed text yields exactly the whole text's ids."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.text import TextCommitter, TextTokenizer, TokenizerError

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


def stream(tok: TextTokenizer, deltas: list[str]) -> list[int]:
    c = TextCommitter(tok)
    out: list[int] = []
    for d in deltas:
        out += c.push(d)
    return out + c.flush()


def whole(tok: TextTokenizer, text: str) -> list[int]:
    return tok.encode(tok.normalize(text).lstrip())


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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from(ALPHABET), min_size=0, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_any_split_equals_whole_text(tokenizer: TextTokenizer, pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    points = sorted({min(c, len(text)) for c in cuts})
    deltas = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert stream(tokenizer, deltas) == whole(tokenizer, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


def test_missing_tokenizer_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer.json and no vocab.json \+ merges.txt"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=r"cannot read vocab\.json/merges\.txt"):
        TextTokenizer.from_dir(tmp_path)
