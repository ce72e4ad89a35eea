"""The native streaming protocol, version 1 (``tts.v1``): messages, validation and frames, no I/O.

``design/PROTOCOL.md`` is the contract; this module is its executable form. The server feeds every
WebSocket frame it receives to :func:`parse_client_message` and gets back one typed, frozen message
or a :class:`ProtocolError` carrying the stable error code to send back. Events going the other
way are frozen dataclasses with ``to_dict()`` / ``to_json()``; binary audio frames are built with
:func:`pack_audio_frame`. Nothing here touches a socket, a clock, numpy or a model, so every
rule is tested by feeding strings, and the voices/languages a model offers are plain parameters.
The one thing borrowed from the engine is its table of sampling bounds
(``engine.sampling.check_sampling``), so that every transport refuses the same values.

Configuration is layered. :class:`SessionConfig` is a complete, effective configuration (the
server's defaults, reported as ``config`` in ``session.created``). ``session.update`` and
``context.create`` carry a partial :class:`ConfigUpdate`; ``config.merged(update)`` applies it.
In an update an absent field (or JSON ``null``) keeps the value below it, except for the two
fields whose value may legitimately be "none", ``instructions`` and ``sampling.seed``: for those
``null`` clears the value and only absence inherits (represented by :data:`UNSET`).

Exceptions::

    Exception
     ├── ProtocolError   a client message was refused, or it conflicts with the session state
     │                   (the server raises those: context_closed, too_many_contexts, ...).
     │                   Carries an ErrorCode, a client-safe message, event_id, context_id and
     │                   fatal; ``exc.to_event()`` is the ``error`` event to send.
     └── ValueError      a programming error on the server side: a Limits value that is not
          │              positive, a header field out of range when packing.
          └── FrameError a received binary frame is malformed (client side).
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Final, TypeAlias

PROTOCOL_VERSION: Final = "tts.v1"
SUBPROTOCOL: Final = "tts.v1"
DEFAULT_CONTEXT_ID: Final = "default"
NATIVE_SAMPLE_RATE: Final = 24000
CODEC_FRAME_MS: Final = 80

ENCODINGS: Final = ("pcm_s16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw")
SAMPLE_RATES: Final = (8000, 16000, 22050, 24000, 44100, 48000)
DEFAULT_CHUNK_SCHEDULE: Final = (1, 2, 4, 8)

# ISO 639-1 codes some clients send instead of Qwen's language names. They are accepted only when
# the name they stand for is one the model offers.
LANGUAGE_ALIASES: Final = {
    "zh": "chinese",
    "en": "english",
    "de": "german",
    "it": "italian",
    "pt": "portuguese",
    "es": "spanish",
    "ja": "japanese",
    "ko": "korean",
    "fr": "french",
    "ru": "russian",
}


class ErrorCode(str, enum.Enum):
    """The stable ``code`` strings of ``error`` events; clients switch on these, never on text."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_VOICE = "invalid_voice"
    INVALID_LANGUAGE = "invalid_language"
    INVALID_OUTPUT = "invalid_output"
    INVALID_SAMPLING = "invalid_sampling"
    CONTEXT_CLOSED = "context_closed"
    TOO_MANY_CONTEXTS = "too_many_contexts"
    MESSAGE_TOO_LARGE = "message_too_large"
    TEXT_TOO_LARGE = "text_too_large"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


# WebSocket close codes after a fatal error: 1008 policy, 1011 internal, 40xx one per protocol code
# (stable, so a client can tell why it was dropped even if it missed the error event).
CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011
CLOSE_PROTOCOL: Final = 4000  # generic: e.g. too many consecutive bad messages
# A send to the client did not complete within the server's write timeout: the client stopped
# reading (or reads far slower than the audio it asked for). Its streams are cancelled.
CLOSE_WRITE_TIMEOUT: Final = 4013
DEFAULT_WRITE_TIMEOUT: Final = 10.0  # seconds, the server's default (`serve --write-timeout`)
_CLOSE_CODES: Final = {
    ErrorCode.INVALID_JSON: 4001,
    ErrorCode.INVALID_MESSAGE: 4002,
    ErrorCode.UNKNOWN_TYPE: 4003,
    ErrorCode.INVALID_VOICE: 4004,
    ErrorCode.INVALID_LANGUAGE: 4005,
    ErrorCode.INVALID_OUTPUT: 4006,
    ErrorCode.INVALID_SAMPLING: 4007,
    ErrorCode.CONTEXT_CLOSED: 4008,
    ErrorCode.TOO_MANY_CONTEXTS: 4009,
    ErrorCode.MESSAGE_TOO_LARGE: 4010,
    ErrorCode.TEXT_TOO_LARGE: 4011,
    ErrorCode.OVERLOADED: 4012,
    ErrorCode.UNAUTHORIZED: CLOSE_POLICY,
    ErrorCode.INTERNAL: CLOSE_INTERNAL,
}


def close_code(code: ErrorCode) -> int:
    """The WebSocket close code to use after a fatal error with this code."""
    return _CLOSE_CODES[code]


EventId: TypeAlias = "str | int | None"
JsonScalar: TypeAlias = "str | int | float | bool | None"


class ProtocolError(Exception):
    """A client message was refused; ``message`` is safe to send (it never holds internal state)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        event_id: EventId = None,
        context_id: str | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.event_id = event_id
        self.context_id = context_id
        self.fatal = fatal

    def with_ids(self, *, event_id: EventId = None, context_id: str | None = None) -> ProtocolError:
        """A copy with ids filled in where this one has none (parsers raise before they know them)."""
        return ProtocolError(
            self.code,
            self.message,
            self.event_id if self.event_id is not None else event_id,
            self.context_id if self.context_id is not None else context_id,
            self.fatal,
        )

    def to_event(self) -> ErrorEvent:
        return ErrorEvent(self.code, self.message, self.context_id, self.event_id, self.fatal)


class FrameError(ValueError):
    """A binary frame is too short to hold the 16-byte audio header."""


# --------------------------------------------------------------------------------------------
# Limits and configuration


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-session limits, reported in ``session.created``; keyword-only so call sites read well.

    The transport's own frame limit (uvicorn ``ws_max_size``, 16 MiB in this server) must be
    set well above ``max_message_bytes``: oversize messages below it get a precise, non-fatal
    ``message_too_large``; only larger ones close the socket (1009).
    """

    max_message_bytes: int = 256 * 1024  # one client frame, as received
    max_text_bytes_per_context: int = 64 * 1024  # UTF-8 bytes of text.append over a context
    max_contexts: int = 4  # open contexts per session
    max_context_id_chars: int = 256
    max_name_chars: int = 256  # voice names, mark names, event ids
    max_instructions_bytes: int = 8 * 1024
    max_chunk_schedule_len: int = 32
    max_chunk_frames: int = 64  # 64 codec frames = 5.12 s of audio per chunk at most
    max_idle_flush_ms: int = 60_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class OutputFormat:
    """What the binary payloads hold: one of :data:`ENCODINGS` at one of :data:`SAMPLE_RATES`."""

    encoding: str = "pcm_s16le"
    sample_rate: int = NATIVE_SAMPLE_RATE


@dataclass(frozen=True)
class SamplingParams:
    """The sampling pipeline's knobs (the official generation_config defaults).

    ``temperature == 0`` means greedy decoding (argmax) for the talker and the code predictor;
    ``top_k == 0`` disables top-k; ``seed`` None draws from the engine's generator.
    """

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TextOptions:
    """How text is buffered: after ``idle_flush_ms`` without new text, unspoken text is flushed.

    0 disables the idle flush (only text.flush / text.end then close an utterance).
    """

    idle_flush_ms: int = 800


class _Unset(enum.Enum):
    """Sentinel type: the field was absent (as opposed to an explicit JSON null)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET


@dataclass(frozen=True)
class ConfigUpdate:
    """A partial configuration from ``session.update`` / ``context.create``: None = not given.

    ``instructions`` and ``seed`` use :data:`UNSET` for "not given" because None is a real value.
    """

    voice: str | None = None
    language: str | None = None
    instructions: str | _Unset | None = UNSET
    encoding: str | None = None
    sample_rate: int | None = None
    chunk_schedule: tuple[int, ...] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | _Unset | None = UNSET
    idle_flush_ms: int | None = None

    @property
    def is_empty(self) -> bool:
        return self == ConfigUpdate()


@dataclass(frozen=True)
class SessionConfig:
    """A complete, effective configuration: the session defaults or one context's settings.

    ``voice`` None means the engine's default voice; a server should fill in the concrete name so
    that ``session.created`` tells the client what it will hear.
    """

    voice: str | None = None
    language: str = "auto"
    instructions: str | None = None
    output: OutputFormat = field(default_factory=OutputFormat)
    chunk_schedule: tuple[int, ...] = DEFAULT_CHUNK_SCHEDULE
    sampling: SamplingParams = field(default_factory=SamplingParams)
    text: TextOptions = field(default_factory=TextOptions)

    def merged(self, update: ConfigUpdate) -> SessionConfig:
        """This configuration with the fields given in ``update`` replaced."""

        def pick(new: Any, old: Any) -> Any:
            return old if new is None or new is UNSET else new

        s = self.sampling
        return SessionConfig(
            voice=pick(update.voice, self.voice),
            language=pick(update.language, self.language),
            instructions=self.instructions if update.instructions is UNSET else update.instructions,
            output=OutputFormat(
                pick(update.encoding, self.output.encoding), pick(update.sample_rate, self.output.sample_rate)
            ),
            chunk_schedule=pick(update.chunk_schedule, self.chunk_schedule),
            sampling=SamplingParams(
                temperature=pick(update.temperature, s.temperature),
                top_k=pick(update.top_k, s.top_k),
                top_p=pick(update.top_p, s.top_p),
                repetition_penalty=pick(update.repetition_penalty, s.repetition_penalty),
                seed=s.seed if update.seed is UNSET else update.seed,
            ),
            text=TextOptions(pick(update.idle_flush_ms, self.text.idle_flush_ms)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: the same keys a client sends in ``session.update``, so it round-trips."""
        d = asdict(self)
        d["chunk_schedule"] = list(self.chunk_schedule)
        return d


# --------------------------------------------------------------------------------------------
# Client -> server messages


@dataclass(frozen=True)
class SessionUpdate:
    type: ClassVar[str] = "session.update"
    config: ConfigUpdate
    event_id: EventId = None


@dataclass(frozen=True)
class ContextCreate:
    type: ClassVar[str] = "context.create"
    context_id: str
    config: ConfigUpdate
    event_id: EventId = None


@dataclass(frozen=True)
class TextAppend:
    type: ClassVar[str] = "text.append"
    context_id: str
    text: str
    event_id: EventId = None


@dataclass(frozen=True)
class TextFlush:
    type: ClassVar[str] = "text.flush"
    context_id: str
    event_id: EventId = None


@dataclass(frozen=True)
class TextEnd:
    type: ClassVar[str] = "text.end"
    context_id: str
    event_id: EventId = None


@dataclass(frozen=True)
class ContextCancel:
    """``context_id`` None cancels every open context."""

    type: ClassVar[str] = "context.cancel"
    context_id: str | None
    event_id: EventId = None


@dataclass(frozen=True)
class Mark:
    type: ClassVar[str] = "mark"
    context_id: str
    name: str
    event_id: EventId = None


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"
    id: JsonScalar = None
    event_id: EventId = None


@dataclass(frozen=True)
class SessionClose:
    type: ClassVar[str] = "session.close"
    event_id: EventId = None


ClientMessage: TypeAlias = (
    SessionUpdate
    | ContextCreate
    | TextAppend
    | TextFlush
    | TextEnd
    | ContextCancel
    | Mark
    | Ping
    | SessionClose
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> int | None:
    """An integer value; integral floats (2.0, as some JSON writers emit) count as integers."""
    if _is_int(v):
        return int(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _as_number(v: Any) -> float | None:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if _is_int(v):
        try:
            return float(v)
        except OverflowError:  # an integer literal with hundreds of digits
            return None
    return None


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def is_valid_unicode(s: str) -> bool:
    """False for a string holding lone surrogates (the JSON escape "\\ud800" decodes to one): it
    has no UTF-8 form, so neither the tokenizer nor a WebSocket text frame can carry it."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_Path: TypeAlias = "tuple[str | int, _Path] | None"  # a field's key and its parent's path


def _invalid_unicode_field(obj: Any) -> str | None:
    """The name of the first field of parsed JSON whose key or string value is not valid Unicode
    ("text", "output.encoding", "chunk_schedule[2]"), else None.

    Iterative, and paths are linked (key, parent) pairs spelled out only for the field found:
    ``json.loads`` accepts nesting close to the recursion limit, and eager path strings for every
    element of a long list deep down would cost quadratic memory.
    """
    stack: list[tuple[Any, _Path]] = [(obj, None)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not is_valid_unicode(value):
                return _spell(path) if path is not None else "the message"
        elif isinstance(value, dict):
            for key in value:  # keys are checked before they join a path
                if not is_valid_unicode(key):
                    return f"a field name in {_spell(path)}" if path is not None else "a field name"
            # Reversed onto the stack, so fields are checked in message order.
            stack.extend((item, (key, path)) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((value[i], (i, path)) for i in range(len(value) - 1, -1, -1))
    return None


def _spell(path: _Path, limit: int = 80) -> str:
    """ "a.b[2]" from a linked path; a long path keeps its end (the field itself) whole."""
    parts: list[str] = []  # leaf first
    size = 0
    while path is not None:
        key, path = path
        name = key if isinstance(key, int) else key[:64]  # keys can be long; the echo stays short
        part = f"[{name}]" if isinstance(name, int) else (f".{name}" if path is not None else name)
        if parts and size + len(part) > limit:
            parts.append("...")
            break
        parts.append(part)
        size += len(part)
    return "".join(reversed(parts))


def resolve_voice(name: str, voices: Collection[str]) -> str:
    """The canonical spelling of ``name`` among ``voices``: exact match, else case-insensitive."""
    if name in voices:
        return name
    folded = [v for v in voices if v.casefold() == name.casefold()]
    if len(folded) == 1:
        return folded[0]
    offered = ", ".join(sorted(voices)[:30]) or "none"
    raise ProtocolError(ErrorCode.INVALID_VOICE, f"unknown voice {name[:64]!r}; available: {offered}")


def resolve_language(name: str, languages: Collection[str]) -> str:
    """The lower-case language name the engine knows, or "auto". Case-insensitive; ISO codes too."""
    lang = name.strip().lower()
    known = {x.lower() for x in languages}
    if lang == "auto" or lang in known:
        return lang
    alias = LANGUAGE_ALIASES.get(lang)
    if alias is not None and alias in known:
        return alias
    offered = ", ".join(["auto", *sorted(known)])
    raise ProtocolError(ErrorCode.INVALID_LANGUAGE, f"unknown language {name[:64]!r}; available: {offered}")


def _sampling(obj: Any) -> dict[str, Any]:
    """Sampling values, checked against the engine's documented bounds (one source of truth).

    Values that would overflow the sampler (a temperature of 1e-300, a top_k of 2**63) are
    refused here, before a stream exists, instead of failing a batched step other streams share.
    """
    # Imported here so that clients importing this module (for the frame header) do not pay for
    # torch, which engine.sampling needs.
    from engine import SamplingError, check_sampling

    if not isinstance(obj, Mapping):
        raise ProtocolError(ErrorCode.INVALID_SAMPLING, "sampling must be an object")
    given: dict[str, Any] = {}
    for name, convert in _SAMPLING_FIELDS:
        if obj.get(name) is not None:
            value = convert(obj[name])
            # A value of the wrong type (a string, a bool, 2.5 for an integer) is checked as NaN:
            # refused with the message that names the field's range.
            given[name] = math.nan if value is None else value
    try:
        check_sampling(**given)
    except SamplingError as e:
        raise ProtocolError(ErrorCode.INVALID_SAMPLING, f"sampling.{e}") from None
    if "seed" in obj and obj["seed"] is None:
        given["seed"] = None  # null clears the seed (absence inherits it)
    return given


_SAMPLING_FIELDS: Final[tuple[tuple[str, Callable[[Any], Any]], ...]] = (
    ("temperature", _as_number),
    ("top_k", _as_int),
    ("top_p", _as_number),
    ("repetition_penalty", _as_number),
    ("seed", _as_int),
)


def _output(obj: Any) -> dict[str, Any]:
    code = ErrorCode.INVALID_OUTPUT
    if not isinstance(obj, Mapping):
        raise ProtocolError(code, "output must be an object")
    out: dict[str, Any] = {}
    if obj.get("encoding") is not None:
        enc = obj["encoding"]
        if not isinstance(enc, str) or enc.lower() not in ENCODINGS:
            raise ProtocolError(code, f"output.encoding must be one of {', '.join(ENCODINGS)}")
        out["encoding"] = enc.lower()
    if obj.get("sample_rate") is not None:
        rate = _as_int(obj["sample_rate"])
        if rate not in SAMPLE_RATES:
            raise ProtocolError(
                code, f"output.sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}"
            )
        out["sample_rate"] = rate
    return out


def _chunk_schedule(obj: Mapping[str, Any], limits: Limits) -> tuple[int, ...] | None:
    schedule, size = obj.get("chunk_schedule"), obj.get("chunk_size")
    if schedule is not None and size is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "give chunk_schedule or chunk_size, not both")
    if schedule is None and size is None:
        return None
    bound = limits.max_chunk_frames
    if size is not None:
        n = _as_int(size)
        if n is None or not 1 <= n <= bound:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"chunk_size must be an integer in [1, {bound}]")
        return (n,)
    if not isinstance(schedule, list) or not 1 <= len(schedule) <= limits.max_chunk_schedule_len:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"chunk_schedule must be a list of 1 to {limits.max_chunk_schedule_len} integers",
        )
    values = [_as_int(v) for v in schedule]
    if any(v is None or not 1 <= v <= bound for v in values):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"chunk_schedule values must be integers in [1, {bound}] (codec frames)",
        )
    return tuple(v for v in values if v is not None)


def parse_config(
    obj: Mapping[str, Any],
    *,
    limits: Limits = DEFAULT_LIMITS,
    voices: Collection[str] | None = None,
    languages: Collection[str] | None = None,
) -> ConfigUpdate:
    """Validate the configuration fields of a ``session.update``-shaped object (others ignored).

    ``voices`` / ``languages``, when given, are what the engine offers: names are checked and
    canonicalized. When None, only their types are checked (validate later with
    :func:`resolve_voice` / :func:`resolve_language`). Also usable for HTTP request bodies.
    """
    kw: dict[str, Any] = {}
    voice = obj.get("voice")
    if voice is not None:
        if not isinstance(voice, str) or not voice.strip() or len(voice) > limits.max_name_chars:
            raise ProtocolError(ErrorCode.INVALID_VOICE, "voice must be a non-empty string")
        kw["voice"] = resolve_voice(voice.strip(), voices) if voices is not None else voice.strip()
    language = obj.get("language")
    if language is not None:
        if not isinstance(language, str) or not language.strip() or len(language) > limits.max_name_chars:
            raise ProtocolError(ErrorCode.INVALID_LANGUAGE, 'language must be "auto" or a language name')
        kw["language"] = (
            resolve_language(language, languages) if languages is not None else language.strip().lower()
        )
    if "instructions" in obj:
        instructions = obj["instructions"]
        if instructions is not None and not isinstance(instructions, str):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "instructions must be a string or null")
        if instructions is not None and _utf8_len(instructions) > limits.max_instructions_bytes:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, f"instructions exceed {limits.max_instructions_bytes} bytes"
            )
        kw["instructions"] = instructions or None  # "" means no instructions
    if obj.get("output") is not None:
        kw.update(_output(obj["output"]))
    schedule = _chunk_schedule(obj, limits)
    if schedule is not None:
        kw["chunk_schedule"] = schedule
    if obj.get("sampling") is not None:
        kw.update(_sampling(obj["sampling"]))
    text = obj.get("text")
    if text is not None:
        if not isinstance(text, Mapping):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "text must be an object like {'idle_flush_ms': 800}"
            )
        if text.get("idle_flush_ms") is not None:
            ms = _as_int(text["idle_flush_ms"])
            if ms is None or not 0 <= ms <= limits.max_idle_flush_ms:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"text.idle_flush_ms must be an integer in [0, {limits.max_idle_flush_ms}] (0 = off)",
                )
            kw["idle_flush_ms"] = ms
    return ConfigUpdate(**kw)


@dataclass(frozen=True)
class _Parse:
    """What a per-type parser needs besides the object."""

    limits: Limits
    voices: Collection[str] | None
    languages: Collection[str] | None
    event_id: EventId


def _context_id(obj: Mapping[str, Any], p: _Parse, *, default: str | None = DEFAULT_CONTEXT_ID) -> str | None:
    cid = obj.get("context_id")
    if cid is None:
        return default
    if not isinstance(cid, str) or not cid or len(cid) > p.limits.max_context_id_chars:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"context_id must be a non-empty string of at most {p.limits.max_context_id_chars} characters",
        )
    return cid


def _required_context_id(obj: Mapping[str, Any], p: _Parse) -> str:
    cid = _context_id(obj, p)
    assert cid is not None  # the default is a string
    return cid


def _config(obj: Mapping[str, Any], p: _Parse) -> ConfigUpdate:
    return parse_config(obj, limits=p.limits, voices=p.voices, languages=p.languages)


def _parse_text_append(obj: Mapping[str, Any], p: _Parse) -> TextAppend:
    cid = _required_context_id(obj, p)
    text = obj.get("text")
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "text.append needs 'text', a string")
    if _utf8_len(text) > p.limits.max_text_bytes_per_context:
        raise ProtocolError(
            ErrorCode.TEXT_TOO_LARGE, f"text exceeds {p.limits.max_text_bytes_per_context} bytes per context"
        )
    return TextAppend(cid, text, p.event_id)


def _parse_mark(obj: Mapping[str, Any], p: _Parse) -> Mark:
    cid = _required_context_id(obj, p)
    name = obj.get("name")
    if not isinstance(name, str) or len(name) > p.limits.max_name_chars:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"mark needs 'name', a string of at most {p.limits.max_name_chars} chars",
        )
    return Mark(cid, name, p.event_id)


def _parse_ping(obj: Mapping[str, Any], p: _Parse) -> Ping:
    pid = obj.get("id")
    if isinstance(pid, (list, dict)) or (isinstance(pid, str) and len(pid) > p.limits.max_name_chars):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "ping id must be a short string or a number")
    return Ping(pid, p.event_id)


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any], _Parse], ClientMessage]]] = {
    "session.update": lambda o, p: SessionUpdate(_config(o, p), p.event_id),
    "context.create": lambda o, p: ContextCreate(_required_context_id(o, p), _config(o, p), p.event_id),
    "text.append": _parse_text_append,
    "text.flush": lambda o, p: TextFlush(_required_context_id(o, p), p.event_id),
    "text.end": lambda o, p: TextEnd(_required_context_id(o, p), p.event_id),
    "context.cancel": lambda o, p: ContextCancel(_context_id(o, p, default=None), p.event_id),
    "mark": _parse_mark,
    "ping": _parse_ping,
    "session.close": lambda o, p: SessionClose(p.event_id),
}
CLIENT_MESSAGE_TYPES: Final = tuple(_PARSERS)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_large(data: str | bytes | bytearray | memoryview, limit: int) -> int | None:
    """The size in bytes when over ``limit``, else None (without encoding short strings)."""
    if isinstance(data, str):
        if len(data) * 4 <= limit:  # UTF-8 needs at most 4 bytes per code point
            return None
        n = _utf8_len(data)
    else:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
    return n if n > limit else None


def parse_client_message(
    data: str | bytes | bytearray | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    voices: Collection[str] | None = None,
    languages: Collection[str] | None = None,
) -> ClientMessage:
    """Parse one WebSocket frame from a client into a message, or raise :class:`ProtocolError`.

    Text and binary frames are both accepted as UTF-8 JSON. Errors are non-fatal and carry the
    message's ``event_id`` (when it could be read) and ``context_id`` (when valid) for the reply.
    Session-state checks (context_closed, too_many_contexts, text budget) are the caller's, with
    :func:`check_text_budget` for the last one.
    """
    size = _too_large(data, limits.max_message_bytes)
    if size is not None:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"message is {size} bytes, the limit is {limits.max_message_bytes}"
        )
    if isinstance(data, str):
        text = data
    else:
        try:  # strictly: json.loads(bytes) would let encoded surrogates and UTF-16 through
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.INVALID_JSON, "invalid JSON: the message is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_JSON, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except (ValueError, RecursionError):  # NaN/Infinity, absurd nesting
        raise ProtocolError(ErrorCode.INVALID_JSON, "invalid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object with a 'type'")
    event_id = obj.get("event_id")
    if not (_is_int(event_id) or (isinstance(event_id, str) and len(event_id) <= limits.max_name_chars)):
        event_id = None  # unusable ids are not echoed, but do not make the message invalid
    elif isinstance(event_id, str) and not is_valid_unicode(event_id):
        event_id = None  # nor are ids that a text frame cannot carry
    cid = obj.get("context_id")
    context_id = cid if isinstance(cid, str) and 0 < len(cid) <= limits.max_context_id_chars else None
    if context_id is not None and not is_valid_unicode(context_id):
        context_id = None
    # Valid UTF-8 input holds no surrogates except through "\\u" escapes: only then walk the object.
    if "\\u" in text or not is_valid_unicode(text):
        bad = _invalid_unicode_field(obj)
        if bad is not None:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"{bad} is not valid Unicode (it holds an unpaired surrogate)",
                event_id,
                context_id,
            )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "a message needs a string 'type'", event_id, context_id
        )
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", event_id, context_id
        )
    try:
        return parser(obj, _Parse(limits, voices, languages, event_id))
    except ProtocolError as exc:
        raise exc.with_ids(event_id=event_id, context_id=context_id) from None


def check_text_budget(used_bytes: int, message: TextAppend, limits: Limits = DEFAULT_LIMITS) -> int:
    """The context's text size after ``message``, or ``text_too_large`` if it would pass the limit.

    The caller keeps ``used_bytes`` per context (it is session state); a refused delta is not
    counted, so the context stays usable for shorter text.
    """
    total = used_bytes + _utf8_len(message.text)
    if total > limits.max_text_bytes_per_context:
        raise ProtocolError(
            ErrorCode.TEXT_TOO_LARGE,
            f"context text would exceed {limits.max_text_bytes_per_context} bytes",
            message.event_id,
            message.context_id,
        )
    return total


# --------------------------------------------------------------------------------------------
# Server -> client events


def _ms(value: float) -> float:
    """Milliseconds on the wire: microsecond resolution is plenty and keeps frames short."""
    return round(float(value), 3)


def samples_to_ms(samples: int, sample_rate: int) -> float:
    return samples * 1000.0 / sample_rate


class _Event:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        """The text frame to send (compact, UTF-8 kept as is). Never fails on a string that has
        no UTF-8 form: such a frame is rendered with ASCII escapes instead, so the writer can
        always send it."""
        frame = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)
        if not is_valid_unicode(frame):
            frame = json.dumps(self.to_dict(), separators=(",", ":"))
        return frame


@dataclass(frozen=True)
class SessionCreated(_Event):
    type: ClassVar[str] = "session.created"
    session_id: str
    model: str
    config: SessionConfig
    limits: Limits = DEFAULT_LIMITS
    voices: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    # What runs the model: {"backend": "torch"|"mlx", "device": ..., "precision": "fp32"|...}.
    engine: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = self.config.output
        return {
            "type": self.type,
            "session_id": self.session_id,
            "protocol": PROTOCOL_VERSION,
            "model": self.model,
            "engine": dict(self.engine),
            "config": self.config.to_dict(),
            "audio": {"encoding": out.encoding, "sample_rate": out.sample_rate, "channels": 1},
            "limits": self.limits.to_dict(),
            "voices": list(self.voices),
            "languages": ["auto", *self.languages],
        }


@dataclass(frozen=True)
class ContextStarted(_Event):
    type: ClassVar[str] = "context.started"
    context_id: str
    stream: int
    encoding: str
    sample_rate: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "context_id": self.context_id,
            "stream": self.stream,
            "encoding": self.encoding,
            "sample_rate": self.sample_rate,
        }


@dataclass(frozen=True)
class MarkEvent(_Event):
    """The echo of a client ``mark``, sent after the audio queued before it."""

    type: ClassVar[str] = "mark"
    context_id: str
    name: str
    audio_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "context_id": self.context_id,
            "name": self.name,
            "audio_ms": _ms(self.audio_ms),
        }


@dataclass(frozen=True)
class ContextFlushed(_Event):
    type: ClassVar[str] = "context.flushed"
    context_id: str
    audio_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "context_id": self.context_id, "audio_ms": _ms(self.audio_ms)}


@dataclass(frozen=True, kw_only=True)
class ContextMetrics:
    """Per-context measurements reported in ``context.done`` (all durations in ms)."""

    first_text_to_first_audio_ms: float | None = None  # None: no audio was produced
    audio_ms: float = 0.0
    generate_ms: float = 0.0
    frames: int = 0  # codec frames (80 ms each)
    stall_ms: float = 0.0  # time the stream waited for text
    utterances: int = 0
    # Utterances the server ended itself because the model never emitted end-of-audio (the
    # text-derived frame budget or the frame cap ran out): their audio may end abruptly.
    truncated: int = 0

    @property
    def rtf(self) -> float | None:
        """Real-time factor generate_ms / audio_ms (< 1 is faster than real time)."""
        return self.generate_ms / self.audio_ms if self.audio_ms > 0 else None

    def to_dict(self) -> dict[str, Any]:
        ttfa = self.first_text_to_first_audio_ms
        rtf = self.rtf
        return {
            "first_text_to_first_audio_ms": None if ttfa is None else _ms(ttfa),
            "audio_ms": _ms(self.audio_ms),
            "generate_ms": _ms(self.generate_ms),
            "rtf": None if rtf is None else round(rtf, 4),
            "frames": self.frames,
            "stall_ms": _ms(self.stall_ms),
            "utterances": self.utterances,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class ContextDone(_Event):
    """``truncated`` is true when at least one utterance of the context was ended by the server
    rather than by the model (``metrics.truncated`` counts them)."""

    type: ClassVar[str] = "context.done"
    context_id: str
    audio_ms: float
    metrics: ContextMetrics = field(default_factory=ContextMetrics)

    @property
    def truncated(self) -> bool:
        return self.metrics.truncated > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "context_id": self.context_id,
            "audio_ms": _ms(self.audio_ms),
            "truncated": self.truncated,
            "metrics": self.metrics.to_dict(),
        }


@dataclass(frozen=True)
class ContextCancelled(_Event):
    """After this event no audio frame of the context's stream may be sent."""

    type: ClassVar[str] = "context.cancelled"
    context_id: str
    audio_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "context_id": self.context_id, "audio_ms": _ms(self.audio_ms)}


@dataclass(frozen=True)
class ErrorEvent(_Event):
    type: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    context_id: str | None = None
    event_id: EventId = None
    fatal: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "code": ErrorCode(self.code).value, "message": self.message}
        if self.context_id is not None:
            d["context_id"] = self.context_id
        if self.event_id is not None:
            d["event_id"] = self.event_id
        d["fatal"] = self.fatal
        return d


@dataclass(frozen=True)
class Pong(_Event):
    type: ClassVar[str] = "pong"
    id: JsonScalar = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id}


ServerEvent: TypeAlias = (
    SessionCreated
    | ContextStarted
    | MarkEvent
    | ContextFlushed
    | ContextDone
    | ContextCancelled
    | ErrorEvent
    | Pong
)


# --------------------------------------------------------------------------------------------
# Binary audio frames

AUDIO_KIND: Final = 1
HEADER_SIZE: Final = 16
_HEADER: Final = struct.Struct("<BBHIQ")
assert _HEADER.size == HEADER_SIZE


class AudioFlags(enum.IntFlag):
    NONE = 0
    FIRST = 1  # first chunk of the context
    LAST = 2  # last chunk of the context
    UTTERANCE_END = 4  # last chunk of an utterance (text.flush, idle flush, or the end)


class FlagsView:
    """`first`, `last` and `utterance_end` read from a `flags` field (header and client chunk)."""

    flags: AudioFlags

    @property
    def first(self) -> bool:
        return bool(self.flags & AudioFlags.FIRST)

    @property
    def last(self) -> bool:
        return bool(self.flags & AudioFlags.LAST)

    @property
    def utterance_end(self) -> bool:
        return bool(self.flags & AudioFlags.UTTERANCE_END)


@dataclass(frozen=True)
class AudioHeader(FlagsView):
    """The 16-byte little-endian header of a binary audio frame.

    ``sample_offset`` counts samples at the output rate from the start of the context, so a client
    can place a chunk exactly even after dropping some; ``seq`` counts frames per context from 0.
    """

    stream: int
    seq: int
    sample_offset: int
    flags: AudioFlags = AudioFlags.NONE
    kind: int = AUDIO_KIND

    def __post_init__(self) -> None:
        for name, bits in (("kind", 8), ("flags", 8), ("stream", 16), ("seq", 32), ("sample_offset", 64)):
            value = int(getattr(self, name))
            if not 0 <= value < 1 << bits:
                raise ValueError(f"AudioHeader.{name}={value} does not fit in {bits} unsigned bits")

    def pack(self) -> bytes:
        return _HEADER.pack(self.kind, int(self.flags), self.stream, self.seq, self.sample_offset)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> AudioHeader:
        """Read the header at the start of ``data``. Unknown kinds are returned, not refused, so a
        client can skip frame kinds added by later protocol versions."""
        if len(data) < HEADER_SIZE:
            raise FrameError(
                f"binary frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header"
            )
        kind, flags, stream, seq, offset = _HEADER.unpack_from(data)
        return cls(stream, seq, offset, AudioFlags(flags), kind)


def pack_audio_frame(
    stream: int,
    seq: int,
    sample_offset: int,
    payload: bytes,
    *,
    first: bool = False,
    last: bool = False,
    utterance_end: bool = False,
) -> bytes:
    """One binary WebSocket frame: header followed by ``payload`` (samples in the session encoding)."""
    flags = AudioFlags.NONE
    if first:
        flags |= AudioFlags.FIRST
    if last:
        flags |= AudioFlags.LAST
    if utterance_end:
        flags |= AudioFlags.UTTERANCE_END
    return AudioHeader(stream, seq, sample_offset, flags).pack() + payload


def unpack_audio_frame(data: bytes | bytearray | memoryview) -> tuple[AudioHeader, bytes]:
    """The header and the payload of a binary frame (client side)."""
    header = AudioHeader.unpack(data)
    return header, bytes(data[HEADER_SIZE:])
