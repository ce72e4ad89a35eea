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

import numpy as np

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
