"""WeCom's message encryption (WXBizMsgCrypt) and the long connection's media decryption, as pure
functions (docs/protocols/wecom.md §3 and §2.11).

Callback (URL) mode, the scheme of Tencent's WXBizMsgCrypt samples, shared by the AI bot's JSON
callbacks and a self-built app's XML ones:

* `EncodingAESKey` is 43 base64 characters; the AES key is `base64decode(EncodingAESKey + "=")`,
  32 bytes, and the IV is its first 16 bytes (AES-256-CBC).
* The plaintext is `random(16) ‖ uint32_be(len(msg)) ‖ msg ‖ receiveid`, PKCS#7-padded to a
  multiple of **32** bytes (not AES's 16), and travels base64-encoded (`encrypt`, `echostr`).
* `receiveid` is the CorpID for a self-built app and empty for an AI bot. With an empty expected
  receiveid nothing is checked (as the official Node SDK's `WecomCrypto` does); a non-empty one
  must match exactly.
* `msg_signature = sha1_hex("".join(sorted([token, timestamp, nonce, encrypt])))`: the four strings
  sorted, not the keys.

Long-connection media (`image`/`file`/`video` with `url` + `aeskey`): AES-256-CBC with
`key = base64decode(aeskey)` (its `=` padding may be missing), `IV = key[:16]`, PKCS#7 to 32 bytes,
no length prefix or receiveid (wecom-aibot-python-sdk 1.0.2 `aibot/crypto_utils.py`).

API (stable; `handlers.wecom.webhook` and `tests/doubles/wecom.py` use it):

* `CallbackCrypto.create(token, encoding_aes_key, receive_id="")` validates the key (CryptoError
  naming the problem), then
  `.signature(timestamp, nonce, encrypt)`, `.check_signature(given, timestamp, nonce, encrypt)`,
  `.encrypt(plaintext, random=None)`, `.decrypt(encrypt)`,
  `.verify_url(msg_signature, timestamp, nonce, echostr)` (the GET check: the plaintext to echo),
  `.open(msg_signature, timestamp, nonce, body)` (a POST body `{"encrypt": …}`: the plaintext), and
  `.seal(plaintext, nonce, timestamp)` (the encrypted passive-reply JSON object).
* `media_key(aeskey)`, `decrypt_media(data, aeskey)`, `encrypt_media(data, aeskey)`.

Everything that is not what the platform would send raises `CryptoError` (a `ValueError`) with a
message saying what is wrong, and never echoes a key or token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass

import orjson
from Crypto.Cipher import AES

from gateway.signing import same

BLOCK = 32  # WeCom's PKCS#7 block size, for callbacks and media alike
KEY_CHARS = 43  # an EncodingAESKey
RANDOM_BYTES = 16
_HEADER = RANDOM_BYTES + 4  # random + uint32_be(len(msg))


class CryptoError(ValueError):
    """Input WeCom would not have produced: bad signature, base64, length, padding or receiveid."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(f"{what} is not base64") from None


def _pad(data: bytes) -> bytes:
    n = BLOCK - len(data) % BLOCK
    return data + bytes([n]) * n


def _unpad(data: bytes, what: str) -> bytes:
    n = data[-1] if data else 0
    if not 1 <= n <= BLOCK or n > len(data) or data[-n:] != bytes([n]) * n:
        raise CryptoError(f"{what}: bad PKCS#7 padding (wrong key, or not WeCom's ciphertext)")
    return data[:-n]


def _cbc_decrypt(key: bytes, data: bytes, what: str) -> bytes:
    if not data or len(data) % AES.block_size:
        raise CryptoError(f"{what}: {len(data)} bytes is not a whole number of AES blocks")
    return _unpad(AES.new(key, AES.MODE_CBC, key[:16]).decrypt(data), what)


def _cbc_encrypt(key: bytes, data: bytes) -> bytes:
    return AES.new(key, AES.MODE_CBC, key[:16]).encrypt(_pad(data))


def aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key of an EncodingAESKey (43 characters, as the admin console shows it)."""
    if len(encoding_aes_key) != KEY_CHARS:
        raise CryptoError(f"EncodingAESKey must be {KEY_CHARS} characters, not {len(encoding_aes_key)}")
    key = _b64decode(encoding_aes_key + "=", "EncodingAESKey")
    if len(key) != 32:  # unreachable for 43 valid characters, kept as the invariant AES-256 needs
        raise CryptoError("EncodingAESKey does not decode to 32 bytes")
    return key


@dataclass(frozen=True, slots=True)
class CallbackCrypto:
    """One bot's (or app's) Token + EncodingAESKey (+ receiveid): WXBizMsgCrypt."""

    token: str
    key: bytes
    receive_id: str = ""

    @classmethod
    def create(cls, token: str, encoding_aes_key: str, receive_id: str = "") -> CallbackCrypto:
        if not token:
            raise CryptoError("Token is empty")
        return cls(token, aes_key(encoding_aes_key), receive_id)

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        joined = "".join(sorted([self.token, timestamp, nonce, encrypt]))
        return hashlib.sha1(joined.encode(errors="surrogateescape")).hexdigest()

    def check_signature(self, given: str, timestamp: str, nonce: str, encrypt: str) -> None:
        """Constant-time; raises CryptoError unless `given` is the signature (hex, any case)."""
        if not same(given.lower(), self.signature(timestamp, nonce, encrypt)):
            raise CryptoError("msg_signature does not match (wrong Token, or the request was altered)")

    def encrypt(self, plaintext: bytes | str, random: bytes | None = None) -> str:
        """base64 ciphertext of `plaintext`; `random` (16 bytes) fixes the prefix for test vectors."""
        msg = plaintext.encode() if isinstance(plaintext, str) else plaintext
        prefix = os.urandom(RANDOM_BYTES) if random is None else random
        if len(prefix) != RANDOM_BYTES:
            raise CryptoError(f"the random prefix must be {RANDOM_BYTES} bytes, not {len(prefix)}")
        raw = prefix + struct.pack(">I", len(msg)) + msg + self.receive_id.encode()
        return base64.b64encode(_cbc_encrypt(self.key, raw)).decode()

    def decrypt(self, encrypt: str) -> bytes:
        """The message inside a base64 ciphertext (without random prefix, length and receiveid)."""
        raw = _cbc_decrypt(self.key, _b64decode(encrypt, "encrypt"), "encrypt")
        if len(raw) < _HEADER:
            raise CryptoError(f"encrypt: plaintext of {len(raw)} bytes is shorter than its header")
        (length,) = struct.unpack(">I", raw[RANDOM_BYTES:_HEADER])
        if length > len(raw) - _HEADER:
            raise CryptoError(f"encrypt: message length {length} exceeds the {len(raw) - _HEADER} bytes present")
        msg, tail = raw[_HEADER : _HEADER + length], raw[_HEADER + length :]
        if self.receive_id and not same(tail.decode(errors="surrogateescape"), self.receive_id):
            raise CryptoError("encrypt: receiveid does not match (a message for another corp or app)")
        return msg

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The URL check (GET): the plaintext of `echostr`, to be answered as the whole body.
        A query parser that reads "+" as a space (form encoding) would break a valid `echostr`:
        base64 has no spaces, so each one is read back as the "+" it was."""
        echostr = echostr.replace(" ", "+")
        self.check_signature(msg_signature, timestamp, nonce, echostr)
        try:
            return self.decrypt(echostr).decode()
        except UnicodeDecodeError:
            raise CryptoError("echostr: plaintext is not UTF-8") from None

    def open(self, msg_signature: str, timestamp: str, nonce: str, body: bytes) -> bytes:
        """A callback POST's plaintext: `body` is the JSON `{"encrypt": "…"}` as received; the
        signature is checked over its `encrypt` before anything is decrypted."""
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CryptoError("body is not JSON") from None
        encrypt = envelope.get("encrypt") if isinstance(envelope, dict) else None
        if not isinstance(encrypt, str) or not encrypt:
            raise CryptoError('body has no "encrypt" string')
        self.check_signature(msg_signature, timestamp, nonce, encrypt)
        return self.decrypt(encrypt)

    def seal(
        self, plaintext: bytes | str, nonce: str, timestamp: int, random: bytes | None = None
    ) -> dict[str, str | int]:
        """The encrypted passive reply: `{"encrypt", "msgsignature", "timestamp", "nonce"}`.
        `nonce` must be the callback URL's nonce; `timestamp` is in seconds."""
        encrypt = self.encrypt(plaintext, random)
        return {
            "encrypt": encrypt,
            "msgsignature": self.signature(str(timestamp), nonce, encrypt),
            "timestamp": timestamp,
            "nonce": nonce,
        }


def media_key(aeskey: str) -> bytes:
    """The 32-byte key of a media `aeskey` (base64, its `=` padding optional)."""
    stripped = aeskey.strip().rstrip("=")
    key = _b64decode(stripped + "=" * (-len(stripped) % 4), "aeskey")
    if len(key) != 32:
        raise CryptoError(f"aeskey decodes to {len(key)} bytes, not 32")
    return key


def decrypt_media(data: bytes, aeskey: str) -> bytes:
    """A downloaded media file's plaintext."""
    return _cbc_decrypt(media_key(aeskey), data, "media")


def encrypt_media(data: bytes, aeskey: str) -> bytes:
    """What WeCom serves at a media URL for this plaintext (the test double uses it)."""
    return _cbc_encrypt(media_key(aeskey), data)
