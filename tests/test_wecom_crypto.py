"""WXBizMsgCrypt and media decryption (handlers/wecom/crypto.py) against Tencent's published test
vectors, AI-bot vectors cross-checked with the official Node SDK, the official Python SDK's
`decrypt_file`, and every malformed input (docs/protocols/wecom.md §3.6, §2.11)."""

from __future__ import annotations

import base64
import contextlib
import struct

import orjson
import pytest
from Crypto.Cipher import AES
from hypothesis import given
from hypothesis import strategies as st

from handlers.wecom.crypto import (
    CallbackCrypto,
    CryptoError,
    aes_key,
    decrypt_media,
    encrypt_media,
    media_key,
)
from tests.oracles.wecom import decrypt_file

# Tencent's WXBizMsgCrypt sample (docs/protocols/wecom.md §3.6): a self-built app of corp
# ww1436e0e65a779aee.
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
ENCODING_AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
CORP_ID = "ww1436e0e65a779aee"
V1_ECHOSTR = "fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA=="
V2_ENCRYPT = (
    "Kl7kjoSf6DMD1zh7rtrHjFaDapSCkaOnwu3bqLc5tAybhhMl9pFeK8NslNPVdMwmBQTNoW4mY7AIjeLvEl3NyeTkAgGzBhzTtRLNshw2AEew"
    "+kkYcD+Fq72Kt00fT0WnN87hGrW8SqGc+NcT3mu87Ha3dz1pSDi6GaUA6A0sqfde0VJPQbZ9U+3JWcoD4Z5jaU0y9GSh010wsHF8KZD24Yhm"
    "ZH4ch4Ka7ilEbjbfvhKkNL65HHL0J6EYJIZUC2pFrdkJ7MhmEbU2qARR4iQHE7wy24qy0cRX3Mfp6iELcDNfSsPGjUQVDGxQDCWjayJOpcwo"
    "cugux082f49HKYg84EpHSGXAyh+/oxwaWbvL6aSDPOYuPDGOCI8jmnKiypE+"
)
V2_PLAIN = (
    "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName>"
    "<CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content>"
    "<MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>"
)
V3_ENCRYPT = (
    "cjhLUX7UU4yCSelv1vz7T0zT8huF51bAMVWriNvO1FMegHrQZNrtvRxbwf0fUPsFvwqR0U0fgiJNEA5Y30F2MoI2S7vv3EjVQ68C0cjw9frB"
    "oUE2Hj0BvFp9h3u6Vbsg4lc1C8AtHdaN8orKuNKkLRLuYEL52R1J3v8olJGZRLnRdVKIivixmX/eQpzgeExtp20jI1HxRP1AAZ6xZoILdqDP"
    "O549LO4WeG+685JRUTdiwcY5fjZlqeMxuT4PpMn1X9OWsS7NRj06Wa5E3Tvg4twjWp39KPfOdRte6P1T4JU="
)
# The AI bot's vectors (receiveid ""), built with the sample's Token and key and fixed prefixes.
AI_CALLBACK_PLAIN = (
    '{"msgid":"MSGID1","aibotid":"AIBOTID","chattype":"single","from":{"userid":"zhangsan"},'
    '"response_url":"https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=RC1",'
    '"msgtype":"text","text":{"content":"hello"}}'
)
AI_CALLBACK_ENCRYPT = (
    "scEag1243Fmy/fYz4Ux8DyaN+QK9EbdihKb/+S8x1YLqdddpPNwt55fVurpn1iEQDbn9r25pVke54uiFQkarOPIilnKSrJVlJ7kmowlhBaNp"
    "yBh0U0UbGRsczr14zAn/dc0+ti9cFRnp0QaPCfciijJu0A4zE36B5YitdnUDY/LWfTRxtopeLGTy8UgzT4eUvmYd2O+e32iulFpWKU7POghs"
    "IFF5qycE/i6I0oGRAxBS+RCiEAAhZfcHlaibCdijuU5O6VuWPeqxpUomAfknXIzHNbmU+f6pL00mO8S3VjPMI+r7yEUWanH/M3XvG6gyoh2N"
    "R6EvGVQZGxEQ4ecI2Q=="
)
AI_ECHOSTR = "nO73TgapHYuqXuswhq+wM5t7GmFvQTlseZoWewdzcgMuBLmxQoEk9ERe7zKBQRUSABz/iSVB7F0lf74VwuLASA=="
AI_REPLY_PLAIN = '{"msgtype":"stream","stream":{"id":"STREAM1","finish":false,"content":"1"}}'
AI_REPLY_ENCRYPT = (
    "QN2oladIJ4D7+XmmlY2y779x4xNu3DgqFOFZ2igVPtGjvoCXfBV9V7zwIuaNYRSHM2Lxy0l3BR6+3D9lQYkLFcthOIy5k8BVvo7O/Nrh+jiU"
    "u/flN1ahZQ9mmH45J0Kv"
)
# A media vector: key bytes 0x00..0x1f, checked with the official SDKs' decrypt functions.
MEDIA_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
MEDIA_CIPHER = bytes.fromhex("12dff1a19c59ce72334abdea8e4bfa73f67ca9fe121cf5aa3dfc1e5ed99ceb31")

APP = CallbackCrypto.create(TOKEN, ENCODING_AES_KEY, CORP_ID)
BOT = CallbackCrypto.create(TOKEN, ENCODING_AES_KEY)


def raw_cipher(plain: bytes, key: bytes = APP.key) -> str:
    """AES-256-CBC (IV = key[:16]) of bytes already padded: ciphertexts our encrypt never makes."""
    return base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(plain)).decode()


def padded(data: bytes) -> bytes:
    n = 32 - len(data) % 32
    return data + bytes([n]) * n


# -- the official vectors -------------------------------------------------------------------------
def test_url_verification_vector() -> None:
    echo = APP.verify_url("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", "1476416373", "47744683", V1_ECHOSTR)
    assert echo == "1288432023552776189"


def test_encrypt_reproduces_the_vector_with_its_random_prefix() -> None:
    assert APP.encrypt("1288432023552776189", random=b"8908d0ff052afda0") == V1_ECHOSTR


@pytest.mark.parametrize(
    ("encrypt", "timestamp", "nonce", "signature", "plain"),
    [
        (V2_ENCRYPT, "1476422779", "1597212914", "0c3914025cb4b4d68103f6bfc8db550f79dcf48e", V2_PLAIN),
        (V3_ENCRYPT, "1409659813", "1372623149", "e3647471e395139e2308c1fa963f2d648a00b90e", None),
    ],
)
def test_callback_vectors(encrypt: str, timestamp: str, nonce: str, signature: str, plain: str | None) -> None:
    body = orjson.dumps({"encrypt": encrypt, "tousername": CORP_ID, "agentid": "218"})  # extra keys ignored
    opened = APP.open(signature, timestamp, nonce, body).decode()
    if plain is not None:
        assert opened == plain
    else:  # Tencent's JSON sample plaintext is deliberately not valid JSON
        assert opened.startswith('{ "ToUserName": "wx5823bf96d3bd56c7"') and '"Content": "hello"' in opened


def test_ai_bot_vectors() -> None:
    assert BOT.open("f3d5c2c87d41b512efe567244f790cc49d26653a", "1700000000", "nonce123",
                    orjson.dumps({"encrypt": AI_CALLBACK_ENCRYPT})).decode() == AI_CALLBACK_PLAIN
    assert BOT.verify_url("4bbfcb6b9db7a884768d170ae6eef7a1d335812f", "1700000001", "n2", AI_ECHOSTR) == (
        "1234567890123456789"
    )
    assert BOT.seal(AI_REPLY_PLAIN, "nonce123", 1700000000, random=b"aaaaaaaaaaaaaaaa") == {
        "encrypt": AI_REPLY_ENCRYPT,
        "msgsignature": "69c81364634845efade2d4ae175e366100a3934d",
        "timestamp": 1700000000,
        "nonce": "nonce123",
    }


def test_a_plus_read_as_a_space_still_verifies() -> None:
    # aiohttp (like any form decoder) turns an unescaped "+" of the query into a space.
    spaced = V1_ECHOSTR.replace("+", " ")
    assert APP.verify_url("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", "1476416373", "47744683", spaced) == (
        "1288432023552776189"
    )


def test_signature_case_is_ignored_but_not_its_digits() -> None:
    APP.check_signature("012BC692D0A58DD4B10F8DFE5C4AC00AE211EBEB", "1476416373", "47744683", V1_ECHOSTR)
    with pytest.raises(CryptoError, match="msg_signature"):
        APP.check_signature("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebec", "1476416373", "47744683", V1_ECHOSTR)


def test_media_vector_and_the_key_without_padding() -> None:
    assert decrypt_media(MEDIA_CIPHER, MEDIA_KEY) == b"hello wecom media"
    assert decrypt_media(MEDIA_CIPHER, MEDIA_KEY.rstrip("=")) == b"hello wecom media"
    assert encrypt_media(b"hello wecom media", MEDIA_KEY) == MEDIA_CIPHER


# -- round trips ------------------------------------------------------------------------------------
@given(st.binary(max_size=3000), st.text(max_size=40))
def test_callback_round_trip(message: bytes, receive_id: str) -> None:
    crypto = CallbackCrypto.create(TOKEN, ENCODING_AES_KEY, receive_id)
    encrypted = crypto.encrypt(message)
    assert len(base64.b64decode(encrypted)) % 32 == 0
    assert crypto.decrypt(encrypted) == message
    sealed = crypto.seal(message, "nonce", 1700000000)
    crypto.check_signature(str(sealed["msgsignature"]), "1700000000", "nonce", str(sealed["encrypt"]))
    assert crypto.open(str(sealed["msgsignature"]), "1700000000", "nonce", orjson.dumps(sealed)) == message


@given(st.binary(min_size=1, max_size=3000), st.binary(min_size=32, max_size=32))
def test_media_round_trip_through_the_official_sdk(data: bytes, key: bytes) -> None:
    aeskey = base64.b64encode(key).decode()
    encrypted = encrypt_media(data, aeskey)
    assert len(encrypted) % 32 == 0
    assert decrypt_file(encrypted, aeskey) == data  # wecom-aibot-python-sdk's own decryption
    assert decrypt_media(encrypted, aeskey) == data


@given(st.text(max_size=200))
def test_any_string_is_decrypted_or_refused(text: str) -> None:
    with contextlib.suppress(CryptoError):
        BOT.decrypt(text)


@given(st.binary(max_size=200))
def test_any_body_is_opened_or_refused(body: bytes) -> None:
    with contextlib.suppress(CryptoError):
        BOT.open("0" * 40, "1", "n", body)


# -- malformed input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("encrypt", "problem"),
    [
        ("not base64!", "not base64"),
        ("", "0 bytes"),
        (base64.b64encode(b"x" * 33).decode(), "33 bytes is not a whole number"),
        (raw_cipher(b"\x00" * 32), "padding"),  # pad byte 0
        (raw_cipher(b"\x21" * 64), "padding"),  # pad byte 33 > 32
        (raw_cipher(b"a" * 31 + b"\x02"), "padding"),  # pad bytes disagree
        (raw_cipher(padded(b"0123456789abcdef\x00")), "shorter than its header"),
        (raw_cipher(padded(b"0123456789abcdef" + struct.pack(">I", 10) + b"short")), "length 10 exceeds"),
        (raw_cipher(padded(b"0123456789abcdef" + struct.pack(">I", 2) + b"hi" + b"wwOTHER")), "receiveid"),
    ],
)
def test_malformed_ciphertexts(encrypt: str, problem: str) -> None:
    with pytest.raises(CryptoError, match=problem):
        APP.decrypt(encrypt)


def test_wrong_key_is_refused() -> None:
    other = CallbackCrypto.create(TOKEN, "A" * 42 + "E", CORP_ID)
    with pytest.raises(CryptoError):
        other.decrypt(V2_ENCRYPT)


def test_an_ai_bot_accepts_any_receiveid_an_app_only_its_own() -> None:
    # The official Node SDK checks nothing for an empty receiveid; an app's CorpID must match.
    assert BOT.decrypt(V2_ENCRYPT).decode() == V2_PLAIN
    with pytest.raises(CryptoError, match="receiveid"):
        CallbackCrypto.create(TOKEN, ENCODING_AES_KEY, "wwsomeoneelse").decrypt(V2_ENCRYPT)


@pytest.mark.parametrize(
    ("signature", "body", "problem"),
    [
        ("0c3914025cb4b4d68103f6bfc8db550f79dcf48e", b"<xml/>", "not JSON"),
        ("0c3914025cb4b4d68103f6bfc8db550f79dcf48e", b"[1]", '"encrypt"'),
        ("0c3914025cb4b4d68103f6bfc8db550f79dcf48e", b'{"Encrypt": "x"}', '"encrypt"'),
        ("0c3914025cb4b4d68103f6bfc8db550f79dcf48e", b'{"encrypt": 5}', '"encrypt"'),
        ("0c3914025cb4b4d68103f6bfc8db550f79dcf48e", b'{"encrypt": ""}', '"encrypt"'),
        ("", orjson.dumps({"encrypt": V2_ENCRYPT}), "msg_signature"),
        ("签名", orjson.dumps({"encrypt": V2_ENCRYPT}), "msg_signature"),  # not ASCII: no TypeError
        ("\udcff", orjson.dumps({"encrypt": V2_ENCRYPT}), "msg_signature"),  # surrogate from aiohttp
    ],
)
def test_malformed_callback_bodies(signature: str, body: bytes, problem: str) -> None:
    with pytest.raises(CryptoError, match=problem):
        APP.open(signature, "1476422779", "1597212914", body)


def test_signature_is_checked_before_decrypting() -> None:
    # A body that would not decrypt, with a wrong signature: the signature is what is reported.
    with pytest.raises(CryptoError, match="msg_signature"):
        APP.open("0" * 40, "1", "n", orjson.dumps({"encrypt": "garbage"}))


def test_a_tampered_timestamp_fails_the_signature() -> None:
    with pytest.raises(CryptoError, match="msg_signature"):
        APP.verify_url("012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", "1476416374", "47744683", V1_ECHOSTR)


def test_echostr_that_is_not_utf8() -> None:
    echostr = APP.encrypt(b"\xff\xfe")
    with pytest.raises(CryptoError, match="UTF-8"):
        APP.verify_url(APP.signature("1", "n", echostr), "1", "n", echostr)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "43 characters, not 0"),
        (ENCODING_AES_KEY + "=", "43 characters, not 44"),
        (ENCODING_AES_KEY[:-1] + "!", "not base64"),
    ],
)
def test_bad_encoding_aes_keys(key: str, problem: str) -> None:
    with pytest.raises(CryptoError, match=problem) as error:
        aes_key(key)
    assert ENCODING_AES_KEY[:10] not in str(error.value)  # a key never appears in the message


def test_empty_token_and_bad_random_prefix() -> None:
    with pytest.raises(CryptoError, match="Token"):
        CallbackCrypto.create("", ENCODING_AES_KEY)
    with pytest.raises(CryptoError, match="16 bytes"):
        BOT.encrypt("x", random=b"short")


@pytest.mark.parametrize(
    ("data", "aeskey", "problem"),
    [
        (MEDIA_CIPHER, "", "0 bytes, not 32"),
        (MEDIA_CIPHER, base64.b64encode(b"k" * 16).decode(), "16 bytes, not 32"),
        (MEDIA_CIPHER, "***", "not base64"),
        (b"", MEDIA_KEY, "0 bytes"),
        (MEDIA_CIPHER[:-1], MEDIA_KEY, "31 bytes"),
        (MEDIA_CIPHER, "AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "padding"),  # another key
    ],
)
def test_malformed_media(data: bytes, aeskey: str, problem: str) -> None:
    with pytest.raises(CryptoError, match=problem):
        decrypt_media(data, aeskey)


def test_media_key_is_the_base64_bytes() -> None:
    assert media_key(MEDIA_KEY) == bytes(range(32))
