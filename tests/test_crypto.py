"""Tests for app.crypto: AES-GCM blobs, key rotation and key-spec parsing."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.crypto import DecryptError, MessageCipher, generate_key_spec, parse_keys
from app.errors import EncryptionError

AAD = b"0b6f6c1e-2f43-4c1a-9d51-2a4f0d0b1c11"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


@pytest.fixture
def cipher() -> MessageCipher:
    return parse_keys(generate_key_spec("k1"))


def test_round_trip(cipher: MessageCipher) -> None:
    """A blob decrypts to the original text and does not contain it in clear."""
    blob = cipher.encrypt("hello, hearth", aad=AAD)

    assert b"hello" not in blob
    assert cipher.decrypt(blob, aad=AAD) == "hello, hearth"


def test_blob_layout(cipher: MessageCipher) -> None:
    """A blob is version, key id length and bytes, 12-byte nonce, ciphertext, 16-byte tag."""
    blob = cipher.encrypt("abc", aad=AAD)

    assert blob[0] == 1
    assert blob[1] == 2
    assert blob[2:4] == b"k1"
    assert len(blob) == 4 + 12 + 3 + 16


def test_nonces_are_fresh(cipher: MessageCipher) -> None:
    """Encrypting the same text twice gives different blobs."""
    assert cipher.encrypt("same", aad=AAD) != cipher.encrypt("same", aad=AAD)


def test_decrypt_accepts_memoryview(cipher: MessageCipher) -> None:
    """A blob handed back by psycopg2 as a memoryview decrypts."""
    blob = cipher.encrypt("from the database", aad=AAD)

    assert cipher.decrypt(memoryview(blob), aad=AAD) == "from the database"


def test_rotation_keeps_old_keys_readable() -> None:
    """After rotating, old blobs still decrypt and new ones use the new current key."""
    old_spec = generate_key_spec("k1")
    new_spec = generate_key_spec("k2")
    old_blob = parse_keys(old_spec).encrypt("before rotation", aad=AAD)

    rotated = parse_keys(f"{new_spec},{old_spec}")
    new_blob = rotated.encrypt("after rotation", aad=AAD)

    assert rotated.current_key_id == "k2"
    assert rotated.key_ids == ("k2", "k1")
    assert rotated.decrypt(old_blob, aad=AAD) == "before rotation"
    assert new_blob[2:4] == b"k2"
    with pytest.raises(DecryptError):
        parse_keys(old_spec).decrypt(new_blob, aad=AAD)


def test_tampered_ciphertext_is_refused(cipher: MessageCipher) -> None:
    """Flipping one bit of the ciphertext makes decryption fail."""
    blob = bytearray(cipher.encrypt("pay alice 10", aad=AAD))
    blob[-20] ^= 0x01

    with pytest.raises(DecryptError):
        cipher.decrypt(bytes(blob), aad=AAD)


def test_tampered_header_is_refused() -> None:
    """Relabelling a blob with another known key id makes decryption fail."""
    cipher = parse_keys(f"{generate_key_spec('ka')},{generate_key_spec('kb')}")
    blob = bytearray(cipher.encrypt("secret", aad=AAD))
    blob[3] = ord("b")

    with pytest.raises(DecryptError, match="authentication failed"):
        cipher.decrypt(bytes(blob), aad=AAD)


def test_wrong_aad_is_refused(cipher: MessageCipher) -> None:
    """A blob moved to another message id does not decrypt."""
    blob = cipher.encrypt("mine", aad=AAD)

    with pytest.raises(DecryptError):
        cipher.decrypt(blob, aad=b"another-message-id")


def test_unknown_key_id_is_refused(cipher: MessageCipher) -> None:
    """A blob under a key the cipher was not given names the missing key id."""
    blob = parse_keys(generate_key_spec("gone")).encrypt("lost", aad=AAD)

    with pytest.raises(DecryptError, match="unknown key id 'gone'"):
        cipher.decrypt(blob, aad=AAD)


@pytest.mark.parametrize("length", [0, 1, 3, 10, 4 + 12 + 15])
def test_truncated_blob_is_refused(cipher: MessageCipher, length: int) -> None:
    """A blob cut short anywhere, even inside the tag, is refused."""
    blob = cipher.encrypt("", aad=AAD)

    with pytest.raises(DecryptError):
        cipher.decrypt(blob[:length], aad=AAD)


def test_unknown_version_is_refused(cipher: MessageCipher) -> None:
    """A blob with a future layout version is refused rather than misread."""
    blob = b"\x02" + cipher.encrypt("v2", aad=AAD)[1:]

    with pytest.raises(DecryptError, match="version 2"):
        cipher.decrypt(blob, aad=AAD)


def test_decrypt_error_is_an_encryption_error() -> None:
    """DecryptError renders as the ENCRYPTION_ERROR 500 of the error model."""
    error = DecryptError("x")

    assert isinstance(error, EncryptionError)
    assert (error.code, error.status) == ("ENCRYPTION_ERROR", 500)


def test_encrypt_failure_hides_plaintext(cipher: MessageCipher) -> None:
    """A failure inside encrypt raises EncryptionError without quoting the plaintext."""
    with pytest.raises(EncryptionError) as caught:
        cipher.encrypt("top secret \ud800", aad=AAD)

    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_bare_key_is_k1() -> None:
    """A spec holding only a base64 key uses key id k1."""
    assert parse_keys(b64(os.urandom(32))).current_key_id == "k1"


@pytest.mark.parametrize("size", [16, 24, 32])
def test_key_sizes_and_alphabets(size: int) -> None:
    """16, 24 and 32-byte keys parse in standard and unpadded URL-safe base64."""
    key = os.urandom(size)
    urlsafe = base64.urlsafe_b64encode(key).decode("ascii").rstrip("=")

    standard_blob = parse_keys(f"a:{b64(key)}").encrypt("x", aad=AAD)

    assert parse_keys(f"a:{urlsafe}").decrypt(standard_blob, aad=AAD) == "x"


#: A key whose base64 is full of ``+`` and ``/``, easy to spot if an error message leaks it.
SECRET = b64(b"\xfb" * 32)
#: The same kind of key, too short for AES.
SHORT = b64(b"\xfb" * 20)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty"),
        (f"k1:{SECRET},", "entry 2 is empty"),
        (f"k1:{SECRET[:-3]}!!!", "not valid base64"),
        (f"k1:{SECRET}A", "not valid base64"),
        (f"k1:{SHORT}", "20 bytes"),
        ("k1:", "empty"),
        (f":{SECRET}", "empty key id"),
        (f"k 1:{SECRET}", "invalid key id"),
        (f"k1:{SECRET},k1:{SECRET}", "more than once"),
        (f"{SECRET},{SECRET}", "more than once"),
    ],
)
def test_bad_specs_never_quote_keys(spec: str, reason: str) -> None:
    """A bad spec raises ValueError naming the problem without any key material."""
    with pytest.raises(ValueError, match=reason) as caught:
        parse_keys(spec)

    message = str(caught.value)
    assert SECRET[:12] not in message
    assert "+" not in message
    assert caught.value.__cause__ is None


def test_repr_hides_keys() -> None:
    """repr shows key ids only, never key bytes or their base64."""
    key = os.urandom(32)
    cipher = parse_keys(f"k9:{b64(key)}")

    text = repr(cipher)

    assert text == "<MessageCipher current='k9' keys=['k9']>"
    assert b64(key) not in text
    assert not hasattr(cipher, "__dict__")


def test_generate_key_spec_parses() -> None:
    """A generated spec is a fresh 32-byte key under the requested id."""
    first, second = generate_key_spec("main"), generate_key_spec("main")

    assert first != second
    assert first.startswith("main:")
    assert len(base64.urlsafe_b64decode(first.removeprefix("main:"))) == 32
    assert parse_keys(first).current_key_id == "main"


def test_generate_key_spec_refuses_bad_id() -> None:
    """generate_key_spec refuses an id that parse_keys would refuse."""
    with pytest.raises(ValueError, match="invalid key id"):
        generate_key_spec("has,comma")


@given(text=st.text(), aad=st.binary(max_size=64))
def test_round_trip_any_text(text: str, aad: bytes) -> None:
    """Any unicode text survives encrypt then decrypt under any aad."""
    cipher = parse_keys("k1:" + b64(b"\x01" * 32))

    assert cipher.decrypt(cipher.encrypt(text, aad=aad), aad=aad) == text
