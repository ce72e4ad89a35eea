"""Voices: the checkpoint's preset speakers plus cloned voices kept in an on-disk store.

A cloned voice is computed once from reference audio (Base models only): its x-vector (ECAPA
speaker encoder), the reference audio's codec codes (speech-tokenizer encoder) and the
reference transcript. With a transcript the voice clones in ICL mode (the reference speech and
text lead the prompt); without one it is x-vector only. Registration stores everything, so
using a voice later costs no audio processing.

The store is SQLite (Python's standard library): a registration is one transaction, so a crash
or a concurrent writer never leaves a half-written voice, and the file survives restarts. Each
voice records the model family it was made for (x-vector width, codec), and is refused by a
model it does not fit.
"""

from __future__ import annotations

import io
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.backend import ResolvedVoice
from engine.errors import VoiceError
from engine.prompt import VoiceSpec

if TYPE_CHECKING:
    from engine.backend import Backend
    from engine.config import ModelConfig
    from engine.text import TextTokenizer

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


class VoiceStoreError(ValueError):
    """A voice cannot be stored, found or used (bad name, unknown id, wrong model...)."""


@dataclass(frozen=True)
class ClonedVoice:
    id: str
    name: str
    xvector: np.ndarray  # float32 [enc_dim]
    ref_codes: np.ndarray | None  # int16 [frames, 16]; None: x-vector only
    ref_text: str | None
    ref_seconds: float
    created: float

    @property
    def mode(self) -> str:
        return "icl" if self.ref_codes is not None and self.ref_text else "xvector"

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id, "name": self.name, "type": "clone", "mode": self.mode,
            "ref_seconds": round(self.ref_seconds, 2), "created": int(self.created),
        }  # fmt: skip


def _blob(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _array(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


class VoiceStore:
    """Cloned voices for one model family (`family` = e.g. "xvec1024"), in one SQLite file."""

    def __init__(self, path: str | Path, family: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.family = family
        self._local = threading.local()
        with self._db() as db:
            db.execute(
                """CREATE TABLE IF NOT EXISTS voices (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, family TEXT NOT NULL,
                    xvector BLOB NOT NULL, ref_codes BLOB, ref_text TEXT,
                    ref_seconds REAL NOT NULL, created REAL NOT NULL)"""
            )
            # Names are looked up case-insensitively, so they are unique case-insensitively.
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS voices_name_ci ON voices(family, lower(name))")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One connection per thread; each `with` block is one transaction."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
            self._local.conn = conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def add(
        self,
        name: str,
        xvector: np.ndarray,
        ref_codes: np.ndarray | None,
        ref_text: str | None,
        ref_seconds: float,
    ) -> ClonedVoice:
        if not isinstance(name, str) or not _NAME.match(name):
            raise VoiceStoreError(
                "voice name must be 1-64 characters: letters, digits, space, '_', '.', '-', starting "
                "with a letter or digit"
            )
        voice = ClonedVoice(
            id="v_" + uuid.uuid4().hex[:16], name=name, xvector=np.asarray(xvector, dtype=np.float32),
            ref_codes=None if ref_codes is None else np.asarray(ref_codes, dtype=np.int16),
            ref_text=ref_text, ref_seconds=float(ref_seconds), created=time.time(),
        )  # fmt: skip
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO voices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        voice.id, name, self.family, _blob(voice.xvector),
                        None if voice.ref_codes is None else _blob(voice.ref_codes),
                        ref_text, voice.ref_seconds, voice.created,
                    ),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise VoiceStoreError(
                f"a voice named {name!r} already exists; delete it first or pick another name"
            ) from None
        return voice

    def get(self, key: str) -> ClonedVoice | None:
        """By id, or by name (case-insensitive)."""
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM voices WHERE family = ? AND (id = ? OR lower(name) = lower(?))",
                (self.family, key, key),
            ).fetchone()
        return None if row is None else _row(row)

    def list(self) -> list[ClonedVoice]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM voices WHERE family = ? ORDER BY created", (self.family,)
            ).fetchall()
        return [_row(r) for r in rows]

    def delete(self, key: str) -> bool:
        with self._db() as db:
            cur = db.execute(
                "DELETE FROM voices WHERE family = ? AND (id = ? OR lower(name) = lower(?))",
                (self.family, key, key),
            )
        return cur.rowcount > 0


def _row(row: tuple) -> ClonedVoice:
    vid, name, _family, xvec, codes, text, seconds, created = row
    return ClonedVoice(
        id=vid, name=name, xvector=_array(xvec), ref_codes=None if codes is None else _array(codes),
        ref_text=text, ref_seconds=seconds, created=created,
    )  # fmt: skip


class Voices:
    """The voices one model offers: its preset speakers, and (Base models) cloned voices.

    Cloning runs the backend's encoders in the caller's thread; the result is stored, so using
    a voice later costs no audio processing.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: TextTokenizer,
        backend: Backend,
        db: str | Path | None,
        sample_rate: int,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.backend = backend
        self.sample_rate = sample_rate  # the codec's: reference audio is resampled to it
        self.store: VoiceStore | None = None
        if db is not None and cfg.speaker_encoder is not None:
            self.store = VoiceStore(db, family=f"xvec{cfg.speaker_encoder.enc_dim}")

    @property
    def names(self) -> list[str]:
        """Preset speakers, then registered clone voices (by id)."""
        clones = [v.id for v in self.store.list()] if self.store is not None else []
        return [*self.cfg.speakers, *clones]

    def describe(self) -> list[dict[str, object]]:
        presets: list[dict[str, object]] = [{"id": n, "name": n, "type": "preset"} for n in self.cfg.speakers]
        clones = [v.describe() for v in self.store.list()] if self.store is not None else []
        return presets + clones

    def default(self) -> str | None:
        speakers = self.cfg.speakers
        if not speakers:
            return None
        return "ryan" if "ryan" in speakers else speakers[0]

    def create(
        self,
        name: str,
        audio: Any,
        *,
        sample_rate: int | None = None,
        ref_text: str | None = None,
        x_vector_only: bool = False,
        max_seconds: float = 60.0,
    ) -> ClonedVoice:
        """See `Engine.create_voice`."""
        from engine.audio import load_audio, prepare_audio

        if self.cfg.model_type != "base" or self.cfg.speaker_encoder is None:
            raise VoiceError(
                # No checkpoint name here: for a local checkpoint it is a server path.
                f"voice cloning needs a Base model (Qwen3-TTS-12Hz-*-Base); this server runs a "
                f"{self.cfg.model_type} model"
            )
        if self.store is None:
            raise VoiceError("this engine has no voice store (start it with a voices database)")
        # The transcript is used verbatim, as the official package does: a trailing newline (a
        # transcript read from a file) changes the prompt's ids and so the audio.
        text = ref_text if ref_text is not None and ref_text.strip() else None
        if not x_vector_only and text is None:
            raise VoiceError(
                "ICL voice cloning needs the transcript of the reference audio (ref_text); "
                "or ask for an x-vector-only voice"
            )
        if isinstance(audio, np.ndarray):
            if sample_rate is None:
                raise VoiceError("a raw audio array needs its sample_rate")
            wav = prepare_audio(audio, sample_rate, self.sample_rate, max_seconds=max_seconds)
        else:
            wav = load_audio(audio, self.sample_rate, max_seconds=max_seconds)
        xvector, codes = self.backend.clone_encode(wav, with_codes=not x_vector_only)
        seconds = len(wav) / self.sample_rate
        return self.store.add(name, xvector, codes, None if x_vector_only else text, seconds)

    def delete(self, key: str) -> bool:
        return self.store.delete(key) if self.store is not None else False

    def resolve(self, name: str | None) -> ResolvedVoice:
        """A preset speaker of a CustomVoice model, a cloned voice, or no voice (VoiceDesign /
        plain Base)."""
        if name is None or name == "":
            if self.cfg.model_type == "custom_voice":
                raise VoiceError(
                    f"this CustomVoice model needs a voice; choose one of: {', '.join(self.names)}"
                )
            return ResolvedVoice(spec=None)
        key = name.strip().lower()
        if key in self.cfg.talker.spk_id:
            spec = VoiceSpec(
                name=key,
                speaker_id=self.cfg.talker.spk_id[key],
                dialect=self.cfg.talker.spk_is_dialect.get(key),
            )
            return ResolvedVoice(spec=spec)
        clone = self.store.get(name.strip()) if self.store is not None else None
        if clone is not None:
            return self._clone_voice(clone)
        offered = ", ".join(self.names) if self.names else "none (this model has no preset voices)"
        raise VoiceError(f"unknown voice {name!r}; this model offers: {offered}")

    def _clone_voice(self, clone: ClonedVoice) -> ResolvedVoice:
        if clone.xvector.shape[0] != self.cfg.talker.transformer.hidden_size:
            raise VoiceError(f"voice {clone.id!r} was made for another model size")
        icl = clone.ref_codes is not None and clone.ref_text is not None
        ref_ids: tuple[int, ...] | None = None
        codes: np.ndarray | None = None
        if icl:
            assert clone.ref_text is not None and clone.ref_codes is not None
            # `<|im_start|>assistant\n{ref_text}<|im_end|>\n` -> ids[3:-2] (MODEL.md §2.1)
            ref_ids = tuple(self.tokenizer.encode("assistant\n" + clone.ref_text)[2:])
            codes = clone.ref_codes.astype(np.int64)
        spec = VoiceSpec(
            name=clone.id,
            has_xvector=True,
            ref_text_ids=ref_ids,
            ref_frames=0 if codes is None else len(codes),
        )
        return ResolvedVoice(spec=spec, xvector=clone.xvector.astype(np.float32), ref_codes=codes)
