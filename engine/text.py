"""Text side of the engine: the Qwen2 byte-level BPE tokenizer and the incremental committer.

The committer is what lets text stream in while the LLM is still writing and still produce
exactly the ids the offline model sees for the whole string (MODEL.md §3.3, point 5). BPE works
inside regex pre-tokens, so an id is final once the pre-token holding it can no longer change.
A pre-token can change when more characters arrive only through what the regex looks at past
its end; `TextCommitter._limit` spells out those cases. Everything before the chosen boundary is
committed; the rest waits for more text, a flush, or the end of the stream. Appending costs
O(len(delta)) amortised: the pending text is never re-split per append (issue #13).
"""

from __future__ import annotations

import base64
import io
import json
import os
import unicodedata
from bisect import bisect_right
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# The Qwen2 pre-tokenizer regex (tokenizer.json of every Qwen2/2.5/3 model).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens of the Qwen3-TTS vocabulary that the engine refers to by name. Prompts are built
# from ids, never by parsing these strings out of user text.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
}


class TokenizerError(ValueError):
    """No usable tokenizer files were found, or they are malformed."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


class TextTokenizer:
    """Qwen2 byte-level BPE over `tokenizers`; user text is always encoded as plain text."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # Text such as "<|im_end|>" inside user input is spoken literally, never turned into a
        # control token: a prompt-injection hazard the official processor has.
        self._tok.encode_special_tokens = True
        self._pre = self._tok.pre_tokenizer
        if self._pre is None:
            raise TokenizerError("tokenizer has no pre-tokenizer; expected the Qwen2 byte-level BPE")

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load `tokenizer.json`, or the official `vocab.json` + `merges.txt` pair."""
        p = Path(path)
        if (p / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(p / "tokenizer.json")))
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if not vocab.is_file() or not merges.is_file():
            raise TokenizerError(f"{p}: no tokenizer.json and no vocab.json + merges.txt")
        added = _added_tokens(p)
        try:
            vocab_map: dict[str, int] = json.loads(vocab.read_text(encoding="utf-8"))
            merge_pairs = [
                tuple(line.split(" "))
                for line in merges.read_text(encoding="utf-8").splitlines()
                if line and not line.startswith("#version")
            ]
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{p}: cannot read vocab.json/merges.txt ({e})") from None
        # Added tokens live outside vocab.json in the official layout; putting them into the
        # BPE vocabulary keeps their official ids despite the gaps between them.
        for content, tid in added.items():
            vocab_map.setdefault(content, tid)
        bpe = models.BPE(vocab_map, merge_pairs)  # type: ignore[arg-type]
        return cls(_assemble(bpe, added))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_before(self, text: str, cut: int) -> list[int]:
        """Ids of `text`'s tokens that start before character `cut`, tokenized in context."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return [tid for tid, (start, _) in zip(enc.ids, enc.offsets, strict=True) if start < cut]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def normalize(self, text: str) -> str:
        norm = self._tok.normalizer
        return norm.normalize_str(text) if norm is not None else text

    def pretoken_starts(self, normalized: str) -> list[int]:
        """Start offsets (in characters) of the regex pre-tokens of already-normalized text."""
        return [start for _, (start, _) in self._pre.pre_tokenize_str(normalized)]

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            tid = SPECIAL_TOKENS.get(token)
        if tid is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return tid


def _added_tokens(p: Path) -> dict[str, int]:
    added = dict(SPECIAL_TOKENS)
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        for tid, info in (data.get("added_tokens_decoder") or {}).items():
            added[info["content"]] = int(tid)
    return added


def _assemble(bpe: models.BPE, added: dict[str, int]) -> Tokenizer:
    """The pipeline transformers' Qwen2 converter builds from vocab.json + merges.txt."""
    from tokenizers import AddedToken

    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in added])
    for content, tid in added.items():
        if tok.token_to_id(content) != tid:
            raise TokenizerError(f"added token {content!r} got id {tok.token_to_id(content)}, expected {tid}")
    return tok


# ---- Tokenizer files for random-weight models ----------------------------------------------
#
# Random-weight checkpoints (benchmarks, tests) still need the real 151,643-entry Qwen2 BPE so
# that text maps to realistic ids. The Apache-2.0 `dashscope` wheel on PyPI ships its ranks as
# `qwen.tiktoken`; we convert them to the vocab.json + merges.txt layout of the official repo.
# (The vocab matches the official file byte for byte; merges are generated, see MODEL.md §6.4.)


def find_qwen_tiktoken() -> Path | None:
    env = os.environ.get("QWEN_TIKTOKEN")
    if env:
        return Path(env)
    spec = find_spec("dashscope")  # located, never imported: we only need the data file
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def write_tokenizer_files(dest: str | os.PathLike[str]) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for the Qwen2 BPE into `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = _converted_tiktoken()
    (dest / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (dest / "merges.txt").write_text(merges_text, encoding="utf-8")
    added = {str(tid): {"content": c, "special": True} for c, tid in SPECIAL_TOKENS.items()}
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "errors": "replace",
        "unk_token": None,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "added_tokens_decoder": added,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return dest


@lru_cache(maxsize=1)
def _converted_tiktoken() -> tuple[str, str]:
    src = find_qwen_tiktoken()
    if src is None:
        raise TokenizerError(
            "random-weight models need the Qwen2 BPE ranks: install them with "
            "`pip install --no-deps dashscope==2.0.2` (or set QWEN_TIKTOKEN=/path/to/qwen.tiktoken)"
        )
    ranks: dict[bytes, int] = {}
    for line in src.read_text(encoding="utf-8").splitlines():
        if line:
            tok_b64, rank_text = line.split()
            ranks[base64.b64decode(tok_b64)] = int(rank_text)
    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab: dict[str, int] = {enc(tok): rank for tok, rank in ranks.items()}
    # One merge per way of splitting a token into two tokens, ordered by the rank of the result
    # (ties by the ranks of the parts): BPE then always applies the lowest-rank merge first,
    # which is what tiktoken's rank-based BPE does.
    merges: list[tuple[int, int, int, str]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                merges.append((rank, rl, rr, f"{enc(left)} {enc(right)}"))
    merges.sort()
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    merges_text = "#version: 0.2\n" + "\n".join(m[3] for m in merges) + "\n"
    return vocab_text, merges_text


# ---- Incremental commit ---------------------------------------------------------------------

# Probes that ask the real pre-tokenizer what class a string's characters are in, so that no
# Unicode table of ours can disagree with the regex: "a" + s is one pre-token iff s is all
# letters (`\p{L}+`); ".." + s, for s without CR/LF, iff s is all `[^\s\p{L}\p{N}]`.
_LETTER_PROBE = "a"
_PUNCT_PROBE = ".."
# A pending pre-token shorter than this is split again rather than probed: cheaper, and one this
# long is no contraction (`'ll`).
_RUN_MIN = 32

_RunKind = Literal["letters", "punct"]


class TextCommitter:
    """Turns text deltas into the token ids that can no longer change.

    For any text and any split into deltas, the concatenation of everything `push()` and
    `flush()` return equals `tokenizer.encode(normalize(text).lstrip())`: the ids the official
    code feeds for the whole string. Leading whitespace of an utterance is dropped because it
    would merge with the newline of the prompt template (`assistant\\n`) and change its ids.

    Ids are committed up to the last pre-token start at or before the *limit* (see `_limit`),
    and each push commits exactly what splitting the whole pending text would, push for push.
    A push costs O(len(delta)) amortised whatever the text, even one character at a time into
    64 KiB of spaces or letters (issue #13). Cheap answers come first:
    - NFC is redone from the last starter only; a delta of combining marks behind a non-space
      starter cannot move the limit, so it is queued until a starter arrives;
    - a pre-token start can only appear after the previous limit, so if the limit did not move
      nothing commits;
    - while the whole pending text is one long letter or punctuation run (`aaaa`, `!!!!`, CJK,
      emoji), a delta of that class only lengthens the pre-token: asked of the delta alone.
    Otherwise the pending text is split again. That commits every pre-token before the one
    holding the limit; what stays is that pre-token (if long, a run that later pushes lengthen
    cheaply) and whitespace or marks after it, which wait for the limit to pass them. So each
    character takes part in a bounded number of splits.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._started = False  # seen a non-whitespace character in this utterance
        self._clear()

    def _clear(self) -> None:
        # The normalized pending text is head + tail, where the tail begins at the last starter:
        # NFC of later text can change nothing before it. The head is a buffer so that appending
        # never copies the whole pending text.
        self._head = _Buffer()
        self._start = 0  # len(head): the tail's start, the last starter
        self._tail = ""
        self._marks = _Buffer()  # queued deltas of combining marks, not yet normalized
        self._last_text = -1  # index of the last non-whitespace character; -1: none
        self._run: _RunKind | None = None  # the pending text is one such pre-token

    @property
    def pending(self) -> str:
        """The normalized, uncommitted text."""
        return self._head.text() + self._normalized_tail()

    @property
    def has_pending(self) -> bool:
        return bool(self._tail)

    def push(self, delta: str) -> list[int]:
        if not delta:
            return []
        if not self._started:
            delta = delta.lstrip()
            if not delta:
                return []
            self._started = True
        if self._tail and self._last_text >= self._start and _all_marks(delta):
            # The limit is the last starter, and marks do not make a new one.
            self._marks.append(delta)
            return []
        before, run_start = self._limit(), self._start
        region = self._extend(delta)
        # The run's first 3 characters, all that its contraction alternative reads, lie before
        # the renormalized region when run_start >= 3: the region alone decides.
        if region is not None and self._run is not None and run_start >= 3 and self._lengthens_run(region):
            return []
        self._run = None
        if self._limit() <= before:
            return []
        return self._commit()

    def flush(self) -> list[int]:
        """Commit everything pending (end of an utterance) and start a new utterance."""
        ids = self._tok.encode(self.pending)
        self._clear()
        self._started = False
        return ids

    def _limit(self) -> int:
        """The last index at or before which a pre-token start is final.

        A pre-token's match depends on what the regex reads at and past its end:
        - letter, digit and punctuation runs stop at a character that is already here;
        - contractions (`'ll`) read at most 2 characters past `'`, and a lone `'` token is
          always followed by a non-letter that settles it;
        - `\\s*[\\r\\n]+` and `\\s+(?!\\S)` read a whole whitespace run: "x\\n " splits as
          `x`,`\\n`,` ` but "x\\n \\n" as `x`,`\\n \\n`, so nothing in a run is final until
          a non-whitespace character closes it;
        - NFC may compose the last starter character with combining marks that arrive later.
        So a start must lie at or before the last non-whitespace character and the last
        starter: then every character an earlier match read is already known, and no later
        text adds a start at or before it either.
        """
        return min(self._start, self._last_text)

    def _normalized_tail(self) -> str:
        marks = self._marks.text()
        return self._tok.normalize(self._tail + marks) if marks else self._tail

    def _extend(self, delta: str) -> str | None:
        """Append `delta`; returns the renormalized region (the old tail onwards), or None when
        the whole pending text had to be rescanned."""
        start = self._start
        # NFC(a) + b normalizes to a[:s] + NFC(a[s:] + b) when a[s] is a starter: nothing
        # reorders across a starter, and what composes with it is behind it.
        marks = self._marks.text()
        region = self._tok.normalize(self._tail + marks + delta)
        if marks:
            self._marks = _Buffer()
        starter = _last_starter(region)
        text = _last_text(region)
        lost_starter = start > 0 and starter == 0 and unicodedata.combining(region[0]) != 0
        lost_text = text < 0 and self._last_text >= start
        if lost_starter or lost_text:
            # NFC turned the old tail's starter into a mark, or its text into whitespace: not
            # possible with Unicode's tables, but exactness should not rest on that.
            self._rescan(self._head.text() + region)
            return None
        if text >= 0:
            self._last_text = start + text
        if starter:
            self._head.append(region[:starter])
            self._start += starter
        self._tail = region[starter:]
        return region

    def _rescan(self, text: str) -> None:
        starter = _last_starter(text)
        self._head, self._start, self._tail = _Buffer(text[:starter]), starter, text[starter:]
        self._last_text = _last_text(text)

    def _lengthens_run(self, region: str) -> bool:
        """Whether the pending text, a single run pre-token before `region`, still is one."""
        if self._run == "letters":
            probe = _LETTER_PROBE + region
        elif "\r" in region or "\n" in region:
            return False  # `[\r\n]*` may end a punctuation pre-token
        else:
            probe = _PUNCT_PROBE + region
        return self._tok.pretoken_starts(probe) == [0]

    def _commit(self) -> list[int]:
        """Split the pending text and commit every pre-token that starts before the limit."""
        text = self._head.text() + self._tail
        starts = self._tok.pretoken_starts(text)
        k = bisect_right(starts, self._limit()) - 1
        ids: list[int] = []
        if k > 0:
            cut = starts[k]
            # Encode in context and keep the ids before the cut: encoding text[:cut] on its own
            # would let the regex see end-of-input there ("a  0" is a,' ',' ',0 but "a  " alone
            # is a,'  '). BPE never crosses a pre-token boundary, so the split by offset is exact.
            ids = self._tok.encode_before(text, cut)
            text, starts = text[cut:], [s - cut for s in starts[k:]]
            self._start -= cut
            self._last_text -= cut
            self._head = _Buffer(text[: self._start])
        self._run = self._run_kind(text, starts)
        return ids

    def _run_kind(self, text: str, starts: list[int]) -> _RunKind | None:
        """Which run, if any, the pending text is, as one pre-token that a delta of the same
        class can only lengthen."""
        if len(starts) != 1 or len(text) < _RUN_MIN:
            return None
        rest = text[1:]
        if self._tok.pretoken_starts(_LETTER_PROBE + rest) == [0]:
            return "letters"  # `[^\r\n\p{L}\p{N}]?\p{L}+`
        if "\r" not in text and "\n" not in text and self._tok.pretoken_starts(_PUNCT_PROBE + rest) == [0]:
            return "punct"  # ` ?[^\s\p{L}\p{N}]+`
        return None


class _Buffer:
    """An appendable string: O(len(text)) amortised per append, where `str +=` copies it all.
    Short text (the usual case: the head is committed within a word) stays a plain str."""

    __slots__ = ("_long", "_short")
    _SHORT = 256

    def __init__(self, text: str = ""):
        self._short = text
        self._long: io.StringIO | None = None

    def append(self, text: str) -> None:
        if self._long is not None:
            self._long.write(text)
        elif len(self._short) + len(text) <= self._SHORT:
            self._short += text
        else:
            self._long = io.StringIO()
            self._long.write(self._short)
            self._long.write(text)

    def text(self) -> str:
        return self._short if self._long is None else self._long.getvalue()


def _all_marks(text: str) -> bool:
    """Whether `text` is only combining marks, even decomposed (U+0F73 is class 0 but NFC makes
    it two marks): then it adds no starter."""
    if not unicodedata.combining(text[0]) and text[0] < "\u0f73":
        return False  # the usual answer, without decomposing (nothing below U+0F73 is like it)
    return all(unicodedata.combining(ch) for ch in unicodedata.normalize("NFD", text))


def _last_starter(text: str) -> int:
    """Index of the last character of canonical combining class 0 (index 0 if none)."""
    i = len(text) - 1
    while i > 0 and unicodedata.combining(text[i]):
        i -= 1
    return i


def _last_text(text: str) -> int:
    """Index of the last non-whitespace character (-1 if none)."""
    i = len(text) - 1
    while i >= 0 and text[i].isspace():
        i -= 1
    return i
