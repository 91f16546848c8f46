"""Encryption at rest: AES-GCM message blobs under rotating keys named in ``HEARTH_MESSAGE_KEY``."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.errors import EncryptionError

__all__ = ["DecryptError", "MessageCipher", "generate_key_spec", "parse_keys"]

#: First byte of every blob; bump it when the layout changes.
BLOB_VERSION = 1
#: Bytes of random nonce per blob, the size AES-GCM is designed for.
NONCE_SIZE = 12
#: Bytes of the GCM authentication tag at the end of every blob.
TAG_SIZE = 16
#: AES key sizes in bytes: AES-128, AES-192, AES-256.
KEY_SIZES = (16, 24, 32)
#: Key id given to a bare base64 key in the spec.
DEFAULT_KEY_ID = "k1"
#: Key ids are short and printable so they can sit in blobs, specs and error messages.
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DecryptError(EncryptionError):
    """A blob could not be decrypted: unknown key, tampered, truncated or wrong aad."""


class MessageCipher:
    """Encrypts with the current key and decrypts with any key it was given.

    *keys* is a sequence of ``(key_id, key_bytes)``; the first is the current key. Raw key
    bytes are not kept on the object, only the AES-GCM contexts, so neither ``repr`` nor
    ``vars`` shows them.
    """

    __slots__ = ("_aeads", "_current_id")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        aeads: dict[str, AESGCM] = {}
        for position, (key_id, key) in enumerate(keys, start=1):
            _check_key_id(key_id, position)
            if key_id in aeads:
                raise ValueError(f"key id {key_id!r} appears more than once")
            _check_key_size(key_id, key)
            aeads[key_id] = AESGCM(key)
        #: AES-GCM context per key id, in spec order.
        self._aeads = aeads
        #: Id of the key new blobs are encrypted with.
        self._current_id = keys[0][0]

    @property
    def current_key_id(self) -> str:
        """Id of the key that `encrypt` uses."""
        return self._current_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id this cipher can decrypt, current first."""
        return tuple(self._aeads)

    def __repr__(self) -> str:
        return f"<MessageCipher current={self._current_id!r} keys={list(self._aeads)!r}>"

    def encrypt(self, plaintext: str, *, aad: bytes) -> bytes:
        """Encrypt *plaintext* under the current key, bound to *aad* (the message id).

        The blob is: version byte, key id length and bytes, 12-byte nonce, ciphertext and tag.
        The header is authenticated too, so it cannot be edited to point at another key.
        Any failure raises `EncryptionError`, whose text never includes the plaintext.
        """
        try:
            header = _header(self._current_id)
            nonce = os.urandom(NONCE_SIZE)
            sealed = self._aeads[self._current_id].encrypt(
                nonce, plaintext.encode("utf-8"), header + aad
            )
        except Exception as exc:
            # Suppress the cause: a UnicodeEncodeError, say, would quote the plaintext.
            raise EncryptionError(f"encryption failed: {type(exc).__name__}") from None
        return header + nonce + sealed

    def decrypt(self, blob: bytes | bytearray | memoryview, *, aad: bytes) -> str:
        """Decrypt *blob* made by `encrypt` for the same *aad*.

        *blob* may be any bytes-like object (psycopg2 returns ``bytea`` as a memoryview).
        Raises `DecryptError` when the blob is truncated, has an unknown version or key id,
        was tampered with, or belongs to another *aad*.
        """
        blob = bytes(blob)
        if len(blob) < 2:
            raise DecryptError("blob is truncated")
        if blob[0] != BLOB_VERSION:
            raise DecryptError(f"unsupported blob version {blob[0]}")
        id_end = 2 + blob[1]
        if len(blob) < id_end + NONCE_SIZE + TAG_SIZE:
            raise DecryptError("blob is truncated")
        key_id = blob[2:id_end].decode("ascii", errors="replace")
        aead = self._aeads.get(key_id)
        if aead is None:
            raise DecryptError(f"unknown key id {key_id!r}")
        nonce = blob[id_end : id_end + NONCE_SIZE]
        try:
            plain = aead.decrypt(nonce, blob[id_end + NONCE_SIZE :], blob[:id_end] + aad)
        except InvalidTag:
            raise DecryptError("authentication failed: tampered blob or wrong aad") from None
        return plain.decode("utf-8")


def parse_keys(spec: str) -> MessageCipher:
    """Build a `MessageCipher` from *spec*, e.g. ``k2:BASE64,k1:BASE64``.

    Entries are comma-separated ``key_id:base64key``; the first is the current key and the
    rest stay readable for rotation. A bare base64 value means key id ``k1``. Keys are 16, 24
    or 32 bytes in standard or URL-safe base64, padding optional. Raises `ValueError` naming
    the entry and the problem, never quoting key material.
    """
    entries = [entry.strip() for entry in spec.split(",")]
    if entries == [""]:
        raise ValueError("the key spec is empty")
    keys: list[tuple[str, bytes]] = []
    for position, entry in enumerate(entries, start=1):
        if not entry:
            raise ValueError(f"entry {position} is empty")
        key_id, colon, encoded = entry.partition(":")
        if colon:
            key_id, encoded = key_id.strip(), encoded.strip()
        else:
            key_id, encoded = DEFAULT_KEY_ID, entry
        _check_key_id(key_id, position)
        keys.append((key_id, _decode_key(key_id, encoded)))
    return MessageCipher(keys)


def generate_key_spec(key_id: str = DEFAULT_KEY_ID) -> str:
    """Return a fresh ``key_id:base64`` entry holding a random 256-bit key.

    *key_id* must be 1-64 of ``A-Z a-z 0-9 _ . -``.
    """
    _check_key_id(key_id, 1)
    key = base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")
    return f"{key_id}:{key}"


def _header(key_id: str) -> bytes:
    encoded = key_id.encode("ascii")
    return bytes((BLOB_VERSION, len(encoded))) + encoded


def _check_key_id(key_id: str, position: int) -> None:
    # The id is not echoed when invalid: a mangled spec might have key material in that slot.
    if not key_id:
        raise ValueError(f"entry {position} has an empty key id")
    if not KEY_ID.fullmatch(key_id):
        raise ValueError(f"entry {position} has an invalid key id; use 1-64 of A-Z a-z 0-9 _ . -")


def _check_key_size(key_id: str, key: bytes) -> None:
    if len(key) not in KEY_SIZES:
        raise ValueError(f"key {key_id!r} is {len(key)} bytes; AES keys are 16, 24 or 32 bytes")


def _decode_key(key_id: str, encoded: str) -> bytes:
    if not encoded:
        raise ValueError(f"key {key_id!r} is empty")
    standard = encoded.replace("-", "+").replace("_", "/")
    standard += "=" * (-len(standard) % 4)
    try:
        key = base64.b64decode(standard, validate=True)
    except (binascii.Error, ValueError):
        # No chaining: binascii's message is harmless today, but the key must never leak.
        raise ValueError(f"key {key_id!r} is not valid base64") from None
    _check_key_size(key_id, key)
    return key
