"""The native protocol core, driven by feeding JSON text and bytes: no sockets, no engine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.protocol import (
    DEFAULT_CHUNK_SCHEDULE,
    DEFAULT_LIMITS,
    HEADER_SIZE,
    UNSET,
    AudioFlags,
    AudioHeader,
    ConfigUpdate,
    ContextCancel,
    ContextCancelled,
    ContextCreate,
    ContextDone,
    ContextFlushed,
    ContextMetrics,
    ContextStarted,
    ErrorCode,
    ErrorEvent,
    FrameError,
    Limits,
    Mark,
    MarkEvent,
    OutputFormat,
    Ping,
    Pong,
    ProtocolError,
    SamplingParams,
    SessionClose,
    SessionConfig,
    SessionCreated,
    SessionUpdate,
    TextAppend,
    TextEnd,
    TextFlush,
    TextOptions,
    check_text_budget,
    close_code,
    pack_audio_frame,
    parse_client_message,
    parse_config,
    resolve_language,
    resolve_voice,
    unpack_audio_frame,
)

VOICES = ("vivian", "serena", "Ryan", "alloy")
LANGUAGES = ("chinese", "english", "German")


def parse(msg: Any, **kw: Any) -> Any:
    return parse_client_message(msg if isinstance(msg, (str, bytes)) else json.dumps(msg), **kw)


def error_of(msg: Any, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(msg, **kw)
    return info.value


# --------------------------------------------------------------------------------------------
# Client messages


def test_every_message_type_parses() -> None:
    assert parse({"type": "session.update"}) == SessionUpdate(ConfigUpdate())
    assert parse({"type": "context.create", "context_id": "t1", "voice": "x"}) == ContextCreate(
        "t1", ConfigUpdate(voice="x")
    )
    assert parse({"type": "text.append", "context_id": "t1", "text": " Hi, "}) == TextAppend("t1", " Hi, ")
    assert parse({"type": "text.flush", "context_id": "t1"}) == TextFlush("t1")
    assert parse({"type": "text.end", "context_id": "t1"}) == TextEnd("t1")
    assert parse({"type": "context.cancel", "context_id": "t1"}) == ContextCancel("t1")
    assert parse({"type": "mark", "context_id": "t1", "name": "m"}) == Mark("t1", "m")
    assert parse({"type": "ping", "id": 42}) == Ping(42)
    assert parse({"type": "session.close"}) == SessionClose()


def test_defaults_context_ids_and_event_ids() -> None:
    # The implicit context is "default" everywhere; only cancel without an id means "all".
    assert parse({"type": "text.append", "text": "a"}) == TextAppend("default", "a")
    assert parse({"type": "text.end"}).context_id == "default"
    assert parse({"type": "context.cancel"}) == ContextCancel(None)
    assert parse({"type": "ping"}) == Ping(None)
    assert parse({"type": "ping", "id": "abc", "event_id": "e1"}) == Ping("abc", "e1")
    assert parse({"type": "text.flush", "event_id": 7}).event_id == 7
    assert parse({"type": "text.flush", "event_id": {"x": 1}}).event_id is None  # unusable: not echoed


def test_text_kept_verbatim_and_binary_frames_accepted() -> None:
    text = "  Grüße, 你好!\n  "
    msg = parse(json.dumps({"type": "text.append", "text": text}).encode())
    assert msg == TextAppend("default", text)
    assert parse({"type": "text.append", "text": ""}).text == ""


def test_unknown_fields_are_ignored() -> None:
    msg = parse({"type": "session.update", "speed": 1.2, "timestamps": "word", "output": {"frame_ms": 20}})
    assert msg == SessionUpdate(ConfigUpdate())
    assert parse({"type": "text.flush", "flush_id": 3}) == TextFlush("default")


def test_full_session_update() -> None:
    msg = parse(
        {
            "type": "session.update",
            "event_id": "e",
            "voice": "vivian",
            "language": "English",
            "instructions": "Speak softly.",
            "output": {"encoding": "pcm_mulaw", "sample_rate": 8000},
            "chunk_schedule": [2, 4],
            "sampling": {"temperature": 0, "top_k": 0, "top_p": 0.5, "repetition_penalty": 1.1, "seed": 7},
            "text": {"idle_flush_ms": 0},
        },
        voices=VOICES,
        languages=LANGUAGES,
    )
    assert msg == SessionUpdate(
        ConfigUpdate(
            voice="vivian",
            language="english",
            instructions="Speak softly.",
            encoding="pcm_mulaw",
            sample_rate=8000,
            chunk_schedule=(2, 4),
            temperature=0.0,
            top_k=0,
            top_p=0.5,
            repetition_penalty=1.1,
            seed=7,
            idle_flush_ms=0,
        ),
        "e",
    )
    cfg = SessionConfig().merged(msg.config)
    assert cfg.sampling.greedy
    assert cfg == SessionConfig(
        voice="vivian",
        language="english",
        instructions="Speak softly.",
        output=OutputFormat("pcm_mulaw", 8000),
        chunk_schedule=(2, 4),
        sampling=SamplingParams(0.0, 0, 0.5, 1.1, 7),
        text=TextOptions(0),
    )


def test_merge_layers_partial_nested_updates() -> None:
    base = SessionConfig(
        voice="serena",
        instructions="calm",
        output=OutputFormat("pcm_f32le", 48000),
        sampling=SamplingParams(seed=5),
    )
    # Absent and null fields inherit; nested objects merge key by key.
    upd = parse_config({"output": {"encoding": "pcm_alaw"}, "voice": None, "sampling": {"top_k": 10}})
    cfg = base.merged(upd)
    assert cfg.output == OutputFormat("pcm_alaw", 48000)
    assert cfg.voice == "serena" and cfg.instructions == "calm"
    assert cfg.sampling == SamplingParams(top_k=10, seed=5)
    # For the nullable fields, null clears and absence inherits.
    assert upd.seed is UNSET and upd.instructions is UNSET
    cleared = base.merged(parse_config({"instructions": None, "sampling": {"seed": None}}))
    assert cleared.instructions is None and cleared.sampling.seed is None
    assert base.merged(parse_config({"instructions": ""})).instructions is None
    assert base.merged(ConfigUpdate()) == base
    assert ConfigUpdate().is_empty and not upd.is_empty


def test_chunk_schedule_and_chunk_size() -> None:
    assert SessionConfig().chunk_schedule == DEFAULT_CHUNK_SCHEDULE == (1, 2, 4, 8)
    assert parse_config({"chunk_size": 3}).chunk_schedule == (3,)
    assert parse_config({"chunk_schedule": [1, 2.0]}).chunk_schedule == (1, 2)
    assert parse_config({"chunk_schedule": None, "chunk_size": None}).chunk_schedule is None


def test_names_are_resolved_case_insensitively() -> None:
    assert resolve_language("English", LANGUAGES) == "english"
    assert resolve_language(" AUTO ", LANGUAGES) == "auto"
    assert resolve_language("german", LANGUAGES) == "german"
    assert resolve_language("en", LANGUAGES) == "english"  # ISO code of an offered language
    with pytest.raises(ProtocolError) as info:
        resolve_language("fr", LANGUAGES)  # alias of a language this model does not offer
    assert info.value.code is ErrorCode.INVALID_LANGUAGE
    assert resolve_voice("ryan", VOICES) == "Ryan"
    assert resolve_voice("Vivian", VOICES) == "vivian"
    # Without the engine's lists only types are checked, and languages are lower-cased.
    assert parse_config({"voice": "anything", "language": "Klingon"}) == ConfigUpdate("anything", "klingon")


def test_context_create_carries_overrides_and_context_id_in_errors() -> None:
    msg = parse({"type": "context.create", "context_id": "c", "output": {"sample_rate": 16000}})
    assert msg == ContextCreate("c", ConfigUpdate(sample_rate=16000))
    err = error_of(
        {"type": "context.create", "context_id": "c", "event_id": "e9", "output": {"encoding": "mp3"}}
    )
    assert (err.code, err.context_id, err.event_id, err.fatal) == (ErrorCode.INVALID_OUTPUT, "c", "e9", False)


BAD_MESSAGES: list[tuple[str, Any, ErrorCode]] = [
    ("truncated", '{"type": "ping"', ErrorCode.INVALID_JSON),
    ("not json", "hello", ErrorCode.INVALID_JSON),
    ("empty", "", ErrorCode.INVALID_JSON),
    ("NaN", '{"type": "ping", "id": NaN}', ErrorCode.INVALID_JSON),
    ("bad utf-8", b'{"type": "\xff"}', ErrorCode.INVALID_JSON),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, ErrorCode.INVALID_JSON),
    ("array", "[1, 2]", ErrorCode.INVALID_MESSAGE),
    ("string", '"text.append"', ErrorCode.INVALID_MESSAGE),
    ("null", "null", ErrorCode.INVALID_MESSAGE),
    ("no type", {"text": "hi"}, ErrorCode.INVALID_MESSAGE),
    ("type not a string", {"type": 3}, ErrorCode.INVALID_MESSAGE),
    ("text missing", {"type": "text.append"}, ErrorCode.INVALID_MESSAGE),
    ("text a number", {"type": "text.append", "text": 5}, ErrorCode.INVALID_MESSAGE),
    ("context_id a number", {"type": "text.flush", "context_id": 1}, ErrorCode.INVALID_MESSAGE),
    ("context_id empty", {"type": "text.end", "context_id": ""}, ErrorCode.INVALID_MESSAGE),
    ("context_id too long", {"type": "context.create", "context_id": "x" * 300}, ErrorCode.INVALID_MESSAGE),
    ("cancel id a list", {"type": "context.cancel", "context_id": ["a"]}, ErrorCode.INVALID_MESSAGE),
    ("mark without name", {"type": "mark"}, ErrorCode.INVALID_MESSAGE),
    ("mark name a number", {"type": "mark", "name": 1}, ErrorCode.INVALID_MESSAGE),
    ("ping id an object", {"type": "ping", "id": {}}, ErrorCode.INVALID_MESSAGE),
    ("instructions a list", {"type": "session.update", "instructions": ["x"]}, ErrorCode.INVALID_MESSAGE),
    ("instructions huge", {"type": "session.update", "instructions": "x" * 9000}, ErrorCode.INVALID_MESSAGE),
    ("text options a string", {"type": "session.update", "text": "hello"}, ErrorCode.INVALID_MESSAGE),
    (
        "idle flush negative",
        {"type": "session.update", "text": {"idle_flush_ms": -1}},
        ErrorCode.INVALID_MESSAGE,
    ),
    (
        "idle flush huge",
        {"type": "session.update", "text": {"idle_flush_ms": 10**6}},
        ErrorCode.INVALID_MESSAGE,
    ),
    ("schedule empty", {"type": "session.update", "chunk_schedule": []}, ErrorCode.INVALID_MESSAGE),
    ("schedule zero", {"type": "session.update", "chunk_schedule": [1, 0]}, ErrorCode.INVALID_MESSAGE),
    ("schedule fraction", {"type": "session.update", "chunk_schedule": [1.5]}, ErrorCode.INVALID_MESSAGE),
    ("schedule bools", {"type": "session.update", "chunk_schedule": [True]}, ErrorCode.INVALID_MESSAGE),
    ("schedule too big", {"type": "session.update", "chunk_schedule": [1000]}, ErrorCode.INVALID_MESSAGE),
    ("schedule too long", {"type": "session.update", "chunk_schedule": [1] * 33}, ErrorCode.INVALID_MESSAGE),
    ("schedule a number", {"type": "session.update", "chunk_schedule": 4}, ErrorCode.INVALID_MESSAGE),
    ("chunk_size zero", {"type": "session.update", "chunk_size": 0}, ErrorCode.INVALID_MESSAGE),
    (
        "schedule and size",
        {"type": "session.update", "chunk_schedule": [1], "chunk_size": 2},
        ErrorCode.INVALID_MESSAGE,
    ),
    ("unknown type", {"type": "speak"}, ErrorCode.UNKNOWN_TYPE),
    ("unknown voice", {"type": "session.update", "voice": "nobody"}, ErrorCode.INVALID_VOICE),
    ("voice a number", {"type": "session.update", "voice": 3}, ErrorCode.INVALID_VOICE),
    ("voice blank", {"type": "context.create", "voice": " "}, ErrorCode.INVALID_VOICE),
    ("unknown language", {"type": "session.update", "language": "klingon"}, ErrorCode.INVALID_LANGUAGE),
    ("language a number", {"type": "session.update", "language": 1}, ErrorCode.INVALID_LANGUAGE),
    ("encoding", {"type": "session.update", "output": {"encoding": "opus"}}, ErrorCode.INVALID_OUTPUT),
    ("encoding a number", {"type": "session.update", "output": {"encoding": 1}}, ErrorCode.INVALID_OUTPUT),
    ("rate", {"type": "session.update", "output": {"sample_rate": 11025}}, ErrorCode.INVALID_OUTPUT),
    (
        "rate a string",
        {"type": "session.update", "output": {"sample_rate": "8000"}},
        ErrorCode.INVALID_OUTPUT,
    ),
    ("output a string", {"type": "session.update", "output": "pcm_s16le"}, ErrorCode.INVALID_OUTPUT),
    ("sampling a list", {"type": "session.update", "sampling": [1]}, ErrorCode.INVALID_SAMPLING),
    (
        "temperature < 0",
        {"type": "session.update", "sampling": {"temperature": -0.1}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature str",
        {"type": "session.update", "sampling": {"temperature": "hot"}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature inf",
        '{"type": "session.update", "sampling": {"temperature": 1e999}}',
        ErrorCode.INVALID_SAMPLING,
    ),
    ("top_k < 0", {"type": "session.update", "sampling": {"top_k": -1}}, ErrorCode.INVALID_SAMPLING),
    ("top_k fraction", {"type": "session.update", "sampling": {"top_k": 2.5}}, ErrorCode.INVALID_SAMPLING),
    ("top_k bool", {"type": "session.update", "sampling": {"top_k": True}}, ErrorCode.INVALID_SAMPLING),
    ("top_p 0", {"type": "session.update", "sampling": {"top_p": 0}}, ErrorCode.INVALID_SAMPLING),
    ("top_p > 1", {"type": "session.update", "sampling": {"top_p": 1.01}}, ErrorCode.INVALID_SAMPLING),
    (
        "penalty 0",
        {"type": "session.update", "sampling": {"repetition_penalty": 0}},
        ErrorCode.INVALID_SAMPLING,
    ),
    ("seed fraction", {"type": "session.update", "sampling": {"seed": 1.5}}, ErrorCode.INVALID_SAMPLING),
    # Values that passed the old checks and broke a batched engine step for every stream in it.
    (
        "temperature 1e-300",
        {"type": "session.update", "sampling": {"temperature": 1e-300}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature 1e308",
        {"type": "session.update", "sampling": {"temperature": 1e308}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature -inf",
        '{"type": "session.update", "sampling": {"temperature": -1e999}}',
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature a 400-digit integer",
        '{"type": "session.update", "sampling": {"temperature": 1' + "0" * 400 + "}}",
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "temperature 'NaN'",
        {"type": "session.update", "sampling": {"temperature": "NaN"}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "penalty 1e-300",
        {"type": "session.update", "sampling": {"repetition_penalty": 1e-300}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "penalty 11",
        {"type": "session.update", "sampling": {"repetition_penalty": 11}},
        ErrorCode.INVALID_SAMPLING,
    ),
    ("top_k 2**63", {"type": "session.update", "sampling": {"top_k": 2**63}}, ErrorCode.INVALID_SAMPLING),
    ("top_k 1e300", {"type": "session.update", "sampling": {"top_k": 1e300}}, ErrorCode.INVALID_SAMPLING),
    (
        "context.create penalty 1e-300",
        {"type": "context.create", "context_id": "c", "sampling": {"repetition_penalty": 1e-300}},
        ErrorCode.INVALID_SAMPLING,
    ),
    (
        "context.create top_k 2**63",
        {"type": "context.create", "context_id": "c", "sampling": {"top_k": 2**63}},
        ErrorCode.INVALID_SAMPLING,
    ),
    ("seed negative", {"type": "session.update", "sampling": {"seed": -1}}, ErrorCode.INVALID_SAMPLING),
    ("seed too big", {"type": "session.update", "sampling": {"seed": 2**64}}, ErrorCode.INVALID_SAMPLING),
    ("seed a string", {"type": "session.update", "sampling": {"seed": "7"}}, ErrorCode.INVALID_SAMPLING),
    ("oversize message", {"type": "text.append", "text": "x" * (256 * 1024)}, ErrorCode.MESSAGE_TOO_LARGE),
    ("oversize text", {"type": "text.append", "text": "é" * (40 * 1024)}, ErrorCode.TEXT_TOO_LARGE),
]


@pytest.mark.parametrize(
    ("raw", "code"), [(raw, code) for _, raw, code in BAD_MESSAGES], ids=[n for n, _, _ in BAD_MESSAGES]
)
def test_bad_messages_get_precise_codes(raw: Any, code: ErrorCode) -> None:
    err = error_of(raw, voices=VOICES, languages=LANGUAGES)
    assert err.code is code
    assert not err.fatal
    event = json.loads(err.to_event().to_json())
    assert event["type"] == "error" and event["code"] == code.value and event["fatal"] is False
    assert isinstance(event["message"], str) and 0 < len(event["message"]) < 600


def test_sampling_bounds_are_the_documented_ones() -> None:
    """The edges of the documented ranges are accepted; just outside them is refused, with a
    message naming the field and its range."""
    edges = [
        {"temperature": 0},
        {"temperature": 0.01},
        {"temperature": 10},
        {"top_k": 0},
        {"top_k": 65536},
        {"top_p": 1},
        {"repetition_penalty": 0.1},
        {"repetition_penalty": 10.0},
        {"seed": 2**64 - 1},
    ]
    for sampling in edges:
        assert parse({"type": "session.update", "sampling": sampling}).config != ConfigUpdate()
    outside = [
        ({"temperature": 0.009}, "sampling.temperature must be 0 (greedy) or a number in [0.01, 10.0]"),
        ({"temperature": 10.5}, "sampling.temperature"),
        ({"top_k": 65537}, "sampling.top_k must be an integer in [0, 65536]"),
        ({"repetition_penalty": 0.09}, "sampling.repetition_penalty must be a number in [0.1, 10.0]"),
    ]
    for sampling, message in outside:
        err = error_of({"type": "context.create", "context_id": "c", "event_id": 3, "sampling": sampling})
        assert (err.code, err.context_id, err.event_id, err.fatal) == (
            ErrorCode.INVALID_SAMPLING,
            "c",
            3,
            False,
        )
        assert err.message.startswith(message)


# A lone surrogate in each place a string can sit; the JSON escape is how a client sends one.
SURROGATE_FIELDS: list[tuple[str, str, str]] = [
    ("text", '{"type": "text.append", "context_id": "c", "text": "Hi \\ud800"}', "text"),
    ("mark name", '{"type": "mark", "context_id": "c", "name": "\\udfff"}', "name"),
    ("context_id", '{"type": "text.append", "context_id": "\\ud800", "text": "hi"}', "context_id"),
    ("cancel context_id", '{"type": "context.cancel", "context_id": "x\\udc00"}', "context_id"),
    ("event_id", '{"type": "text.flush", "event_id": "\\ud800"}', "event_id"),
    ("ping id", '{"type": "ping", "id": "\\ud800"}', "id"),
    ("voice", '{"type": "session.update", "voice": "ryan\\ud800"}', "voice"),
    ("language", '{"type": "session.update", "language": "\\ud800"}', "language"),
    (
        "instructions",
        '{"type": "context.create", "context_id": "c", "instructions": "\\ud800"}',
        "instructions",
    ),
    ("encoding", '{"type": "session.update", "output": {"encoding": "\\ud800"}}', "output.encoding"),
    ("type", '{"type": "\\ud800"}', "type"),
    ("unknown field", '{"type": "ping", "extra": ["ok", "\\ud800"]}', "extra[1]"),
    ("field name", '{"type": "ping", "\\ud800": 1}', "a field name"),
]


@pytest.mark.parametrize(
    ("raw", "field"), [(raw, f) for _, raw, f in SURROGATE_FIELDS], ids=[n for n, _, _ in SURROGATE_FIELDS]
)
def test_lone_surrogates_anywhere_are_a_precise_error(raw: str, field: str) -> None:
    for frame in (raw, raw.encode()):  # text and binary frames
        err = error_of(frame)
        assert err.code is ErrorCode.INVALID_MESSAGE and not err.fatal
        assert err.message == f"{field} is not valid Unicode (it holds an unpaired surrogate)"
        # The error frame can be sent: it holds no unencodable string (ids included).
        err.to_event().to_json().encode("utf-8")


def test_surrogate_errors_echo_only_valid_ids() -> None:
    err = error_of('{"type": "text.append", "context_id": "c", "event_id": "e", "text": "\\ud800"}')
    assert (err.event_id, err.context_id) == ("e", "c")
    err = error_of('{"type": "text.append", "context_id": "\\ud800", "event_id": "\\udc00", "text": "x"}')
    assert (err.event_id, err.context_id) == (None, None)


def test_valid_escapes_and_encoded_surrogates() -> None:
    # A surrogate pair is one valid character; a surrogate encoded in the bytes is not UTF-8.
    assert parse('{"type": "text.append", "text": "\\ud83d\\ude00 \\u00fc"}').text == "\U0001f600 ü"
    assert parse(b'{"type": "text.append", "text": "\\\\ud800"}').text == "\\ud800"  # an escaped backslash
    assert error_of(b'{"type": "text.append", "text": "\xed\xa0\x80"}').code is ErrorCode.INVALID_JSON
    # Deep nesting that the JSON parser accepts is walked without recursion.
    deep = '{"type": "ping", "x": ' + "[" * 900 + '"\\ud800"' + "]" * 900 + "}"
    message = error_of(deep).message
    assert message.startswith("...[0][0]") and len(message) < 200
    two = '{"type": "ping", "a": "\\ud800", "b": {"c": "\\udc00"}}'
    assert error_of(two).message.startswith("a is not valid")  # the first one, in message order
    assert error_of(two.replace('"a"', '"z"')).message.startswith("z is not valid")


def test_event_frames_never_fail_on_unencodable_strings() -> None:
    for event in (
        MarkEvent("c", "bad \ud800", 0),
        ErrorEvent(ErrorCode.INVALID_MESSAGE, "message \udfff", "c\ud800", "e\ud800"),
        Pong("\ud800"),
    ):
        frame = event.to_json()
        frame.encode("utf-8")
        assert json.loads(frame) == event.to_dict()  # the escapes round-trip
    assert "ü" in MarkEvent("c", "grüße", 0).to_json()  # valid text stays unescaped


def test_errors_echo_event_and_context_ids() -> None:
    err = error_of({"type": "text.append", "context_id": "c1", "event_id": "e1", "text": 1})
    assert (err.event_id, err.context_id) == ("e1", "c1")
    err = error_of({"type": "nope", "event_id": 5, "context_id": "c2"})
    assert (err.code, err.event_id, err.context_id) == (ErrorCode.UNKNOWN_TYPE, 5, "c2")
    event = err.to_event().to_dict()
    assert event == {
        "type": "error",
        "code": "unknown_type",
        "message": "unknown message type 'nope'",
        "context_id": "c2",
        "event_id": 5,
        "fatal": False,
    }


def test_message_size_is_counted_in_utf8_bytes() -> None:
    limits = Limits(max_message_bytes=100, max_text_bytes_per_context=1000)
    small = json.dumps({"type": "text.append", "text": "é" * 30}, ensure_ascii=False)  # 30 chars, 60 bytes
    assert parse(small, limits=limits).text == "é" * 30
    big = json.dumps(
        {"type": "text.append", "text": "é" * 45}, ensure_ascii=False
    )  # < 100 chars, > 100 bytes
    assert len(big) < 100 and error_of(big, limits=limits).code is ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        parse_client_message(bytearray(b" " * 101), limits=limits)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_text_budget_over_a_context() -> None:
    limits = Limits(max_text_bytes_per_context=10)
    used = check_text_budget(0, TextAppend("c", "hello"), limits)
    used = check_text_budget(used, TextAppend("c", "wörl"), limits)
    assert used == 10
    with pytest.raises(ProtocolError) as info:
        check_text_budget(used, TextAppend("c", "!", event_id="e"), limits)
    assert (info.value.code, info.value.context_id, info.value.event_id) == (
        ErrorCode.TEXT_TOO_LARGE,
        "c",
        "e",
    )


def test_session_state_errors_and_close_codes() -> None:
    err = ProtocolError(ErrorCode.CONTEXT_CLOSED, "context c was ended", context_id="c")
    assert err.to_event() == ErrorEvent(ErrorCode.CONTEXT_CLOSED, "context c was ended", "c")
    assert str(err) == "context_closed: context c was ended"
    fatal = ProtocolError(ErrorCode.INTERNAL, "internal error", fatal=True)
    assert json.loads(fatal.to_event().to_json()) == {
        "type": "error",
        "code": "internal",
        "message": "internal error",
        "fatal": True,
    }
    codes = {code: close_code(code) for code in ErrorCode}
    assert codes[ErrorCode.UNAUTHORIZED] == 1008 and codes[ErrorCode.INTERNAL] == 1011
    protocol_codes = [
        c for code, c in codes.items() if code not in (ErrorCode.UNAUTHORIZED, ErrorCode.INTERNAL)
    ]
    assert all(4000 <= c <= 4099 for c in protocol_codes) and len(set(protocol_codes)) == len(protocol_codes)
    assert {c.value for c in ErrorCode} == {
        "invalid_json", "invalid_message", "unknown_type", "invalid_voice", "invalid_language",
        "invalid_output", "invalid_sampling", "context_closed", "too_many_contexts",
        "message_too_large", "text_too_large", "unauthorized", "overloaded", "internal",
    }  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["type", "context_id", "text", "voice", "language", "output", "sampling", "chunk_schedule", "name", "id"]
)


# Generating nested JSON is slow on a busy machine: hypothesis's too_slow health check and its
# per-example deadline measure the machine, not the parser. Every example still runs.
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)


@FUZZ
@given(
    st.sampled_from(
        ["session.update", "context.create", "text.append", "mark", "ping", "context.cancel", "x"]
    ),
    st.dictionaries(FIELDS, JSON, max_size=5),
)
def test_fuzzed_messages_parse_or_raise_protocol_error(kind: str, extra: dict[str, Any]) -> None:
    obj = {"type": kind, **extra}
    try:
        msg = parse(obj, voices=VOICES, languages=LANGUAGES)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        json.loads(exc.to_event().to_json())
    else:
        assert msg.type == obj["type"]


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_garbage_frames_never_escape_as_other_exceptions(data: str | bytes) -> None:
    try:
        parse_client_message(data)
    except ProtocolError:
        pass


@FUZZ
@given(
    st.sampled_from(["session.update", "context.create", "text.append", "mark", "ping", "text.flush"]),
    st.dictionaries(
        FIELDS | st.just("event_id") | st.just("instructions"),
        st.text(st.characters(codec=None, categories=["Cs", "Ll", "Nd"]), max_size=6),
        max_size=4,
    ),
)
def test_fuzzed_surrogates_never_escape(kind: str, extra: dict[str, Any]) -> None:
    raw = json.dumps({"type": kind, **extra})  # ASCII escapes, as a client would send them
    try:
        msg = parse(raw, voices=VOICES, languages=LANGUAGES)
    except ProtocolError as exc:
        exc.to_event().to_json().encode("utf-8")
    else:
        json.dumps(dataclasses.asdict(msg), ensure_ascii=False, default=str).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Limits and configuration


def test_limits_are_keyword_only_with_documented_defaults() -> None:
    assert DEFAULT_LIMITS.max_message_bytes == 256 * 1024
    assert DEFAULT_LIMITS.max_text_bytes_per_context == 64 * 1024
    assert DEFAULT_LIMITS.max_contexts == 4
    with pytest.raises(TypeError):
        Limits(1024)  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_contexts"):
        Limits(max_contexts=0)
    assert Limits(max_contexts=2).to_dict()["max_contexts"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_contexts = 9  # type: ignore[misc]


def test_default_session_config() -> None:
    cfg = SessionConfig()
    assert cfg.output == OutputFormat("pcm_s16le", 24000)
    assert cfg.sampling == SamplingParams(0.9, 50, 1.0, 1.05, None) and not cfg.sampling.greedy
    assert cfg.text.idle_flush_ms == 800 and cfg.language == "auto"


@FUZZ
@given(
    st.builds(
        SessionConfig,
        voice=st.sampled_from(VOICES),
        language=st.sampled_from(["auto", "english", "chinese"]),
        instructions=st.none() | st.text(min_size=1, max_size=30),
        output=st.builds(
            OutputFormat, st.sampled_from(["pcm_s16le", "pcm_alaw"]), st.sampled_from([8000, 48000])
        ),
        chunk_schedule=st.lists(st.integers(1, 64), min_size=1, max_size=8).map(tuple),
        sampling=st.builds(
            SamplingParams,
            st.just(0.0) | st.floats(0.01, 10),  # the documented bounds: 0 (greedy) or [0.01, 10]
            st.integers(0, 100),
            st.floats(0.01, 1),
            st.floats(0.5, 2),
            st.none() | st.integers(0, 2**64 - 1),
        ),
        text=st.builds(TextOptions, st.integers(0, 60_000)),
    )
)
def test_config_to_dict_round_trips_through_session_update(cfg: SessionConfig) -> None:
    wire = json.loads(json.dumps(cfg.to_dict()))
    assert SessionConfig(voice="other", instructions="x").merged(parse_config(wire)) == cfg


# --------------------------------------------------------------------------------------------
# Server events


def test_session_created_frame() -> None:
    cfg = SessionConfig(voice="vivian", output=OutputFormat("pcm_mulaw", 8000))
    event = json.loads(
        SessionCreated(
            "s_1", "Qwen3-TTS-12Hz-0.6B-CustomVoice", cfg, Limits(max_contexts=2), VOICES, LANGUAGES
        ).to_json()
    )
    assert event["type"] == "session.created" and event["protocol"] == "tts.v1"
    assert event["session_id"] == "s_1" and event["model"] == "Qwen3-TTS-12Hz-0.6B-CustomVoice"
    assert event["audio"] == {"encoding": "pcm_mulaw", "sample_rate": 8000, "channels": 1}
    assert event["config"]["output"] == {"encoding": "pcm_mulaw", "sample_rate": 8000}
    assert event["config"]["chunk_schedule"] == [1, 2, 4, 8]
    assert event["config"]["sampling"]["seed"] is None
    assert event["limits"]["max_contexts"] == 2 and event["limits"]["max_message_bytes"] == 262144
    assert event["voices"] == list(VOICES) and event["languages"] == ["auto", *LANGUAGES]


def test_context_event_frames() -> None:
    assert json.loads(ContextStarted("c", 3, "pcm_s16le", 24000).to_json()) == {
        "type": "context.started",
        "context_id": "c",
        "stream": 3,
        "encoding": "pcm_s16le",
        "sample_rate": 24000,
    }
    assert MarkEvent("c", "m", 1840.0).to_dict() == {
        "type": "mark",
        "context_id": "c",
        "name": "m",
        "audio_ms": 1840.0,
    }
    assert ContextFlushed("c", 1 / 3).to_dict()["audio_ms"] == 0.333
    assert ContextCancelled("c", 80).to_dict() == {
        "type": "context.cancelled",
        "context_id": "c",
        "audio_ms": 80.0,
    }
    assert Pong(42).to_json() == '{"type":"pong","id":42}'
    metrics = ContextMetrics(
        first_text_to_first_audio_ms=142.5,
        audio_ms=5120,
        generate_ms=512,
        frames=64,
        stall_ms=30,
        utterances=2,
    )
    done = json.loads(ContextDone("c", 5120, metrics).to_json())
    assert done == {
        "type": "context.done",
        "context_id": "c",
        "audio_ms": 5120.0,
        "truncated": False,
        "metrics": {
            "first_text_to_first_audio_ms": 142.5,
            "audio_ms": 5120.0,
            "generate_ms": 512.0,
            "rtf": 0.1,
            "frames": 64,
            "stall_ms": 30.0,
            "utterances": 2,
            "truncated": 0,
        },
    }
    empty = ContextDone("c", 0).to_dict()["metrics"]
    assert empty["rtf"] is None and empty["first_text_to_first_audio_ms"] is None
    assert json.loads(ErrorEvent(ErrorCode.OVERLOADED, "busy", event_id="e").to_json())["event_id"] == "e"


def test_event_json_keeps_unicode() -> None:
    assert "ü" in MarkEvent("c", "grüße", 0).to_json()


def test_context_done_reports_truncated_utterances() -> None:
    done = ContextDone("c", 800, ContextMetrics(audio_ms=800, frames=10, utterances=2, truncated=1))
    assert done.truncated
    frame = json.loads(done.to_json())
    assert frame["truncated"] is True and frame["metrics"]["truncated"] == 1
    assert json.loads(ContextDone("c", 0).to_json())["truncated"] is False


# --------------------------------------------------------------------------------------------
# Binary audio header


def test_header_layout_is_little_endian() -> None:
    frame = pack_audio_frame(0x0102, 0x03040506, 0x0708, b"\xaa\xbb", first=True, utterance_end=True)
    assert frame[:HEADER_SIZE] == bytes(
        [1, 0b101, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x08, 0x07, 0, 0, 0, 0, 0, 0]
    )
    header, payload = unpack_audio_frame(frame)
    assert payload == b"\xaa\xbb"
    assert header.first and header.utterance_end and not header.last
    assert header == AudioHeader(0x0102, 0x03040506, 0x0708, AudioFlags.FIRST | AudioFlags.UTTERANCE_END)


@given(
    stream=st.integers(0, 2**16 - 1),
    seq=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1),
    first=st.booleans(),
    last=st.booleans(),
    utterance_end=st.booleans(),
    payload=st.binary(max_size=64),
)
def test_header_round_trip(
    stream: int, seq: int, offset: int, first: bool, last: bool, utterance_end: bool, payload: bytes
) -> None:
    frame = pack_audio_frame(
        stream, seq, offset, payload, first=first, last=last, utterance_end=utterance_end
    )
    assert len(frame) == HEADER_SIZE + len(payload)
    header, body = unpack_audio_frame(memoryview(frame))
    assert (header.kind, header.stream, header.seq, header.sample_offset) == (1, stream, seq, offset)
    assert (header.first, header.last, header.utterance_end) == (first, last, utterance_end)
    assert body == payload
    assert AudioHeader.unpack(header.pack()) == header


def test_header_errors() -> None:
    with pytest.raises(FrameError):
        unpack_audio_frame(b"\x01" * 15)
    with pytest.raises(ValueError, match="stream"):
        AudioHeader(2**16, 0, 0)
    with pytest.raises(ValueError, match="seq"):
        AudioHeader(0, -1, 0)
    # Unknown kinds and flag bits are read back, not refused, so old clients can skip new frames.
    header = AudioHeader.unpack(bytes([9, 0x18]) + bytes(14))
    assert header.kind == 9 and int(header.flags) == 0x18
