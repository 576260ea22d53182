"""Admin credentials: JWT HS256 by hand (hmac/hashlib), the login token, session revocation, a
failed-login limiter and the audit log.

There is always a credential (docs/security.md): `[admin] password` when set, otherwise a random
*login token* kept 0600 in the state directory (`login-token`; memory only with a `memory://` store)
and announced once per start as a login link. A login yields a session: a JWT carrying when the
credential was last confirmed (`auth_time`, for operations that want a recent re-authentication),
a fingerprint of the credential (changing the password or rotating the token ends every session) and
the session epoch (`session-epoch` in the state directory; a logout bumps it, ending every session).

Only HS256 is accepted (a token naming any other algorithm, "none" included, is refused before its
signature is looked at). Every secret comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .config import AdminConfig, ServerConfig

log = logging.getLogger(__name__)
# Audit records (`"audit": true`) are written whatever `[log] level` says.
audit_log = logging.getLogger("botgate.audit")
audit_log.setLevel(logging.INFO)

REAUTH_WINDOW = 300.0  # seconds a confirmed password or login token counts as "recent"
LOGIN_TOKEN_FILE = "login-token"
EPOCH_FILE = "session-epoch"
PASSWORD = "password"
LOGIN_TOKEN = "login-token"

_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(Exception):
    """A token that must not be honoured; the message says why (malformed, signature, expired)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise TokenError("malformed token") from e


def _sign(secret: bytes, signing_input: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def encode(secret: bytes, claims: dict[str, Any]) -> str:
    head = _b64encode(orjson.dumps(_HEADER))
    body = _b64encode(orjson.dumps(claims))
    signing_input = f"{head}.{body}".encode("ascii")
    return f"{head}.{body}.{_b64encode(_sign(secret, signing_input))}"


def decode(secret: bytes, token: str, now: float | None = None) -> dict[str, Any]:
    """Verify signature and expiry; return the claims or raise `TokenError`."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenError("malformed token")
    try:
        header = orjson.loads(_b64decode(parts[0]))
    except orjson.JSONDecodeError as e:
        raise TokenError("malformed token") from e
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("unsupported token algorithm")
    expected = _b64encode(_sign(secret, f"{parts[0]}.{parts[1]}".encode("ascii")))
    # Compared as text: base64's spare bits would let several spellings decode to the same bytes.
    if not hmac.compare_digest(expected.encode(), parts[2].encode("utf-8", "replace")):
        raise TokenError("bad token signature")
    try:
        claims = orjson.loads(_b64decode(parts[1]))
    except orjson.JSONDecodeError as e:
        raise TokenError("malformed token") from e
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise TokenError("token has no expiry")
    if (time.time() if now is None else now) >= exp:
        raise TokenError("token expired")
    return claims




def password_matches(given: str, expected: str) -> bool:
    """Constant-time, also in the length: both sides are hashed to 32 bytes first."""
    if not expected:
        return False
    a = hashlib.sha256(given.encode("utf-8")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def bearer_matches(header: str, token: str) -> bool:
    """Does an `Authorization` header carry exactly `Bearer <token>`?"""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and password_matches(value.strip(), token)


def audit(action: str, result: str, **fields: Any) -> None:
    """One audit record: what (`action`), the outcome (`result`: ok, refused, failed), and who and
    from where (`actor`, `credential`, `session`, `client`, ... as the caller knows them)."""
    audit_log.info(
        "audit: %s %s", action, result, extra={"audit": True, "action": action, "result": result, **fields}
    )


# -- secrets kept in the state directory ------------------------------------------------------------
class StateFile:
    """A small secret text file (mode 0600) in the state directory, re-read whenever it changes on
    disk (another process — `python run.py rotate-login-token` — may replace it). `path` None keeps
    the value in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._value: str | None = None
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> str | None:
        if self.path is None:
            return self._value
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._value  # removed under us: keep what we had (a start makes a new one)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._seen:
            if stat.S_IMODE(st.st_mode) & 0o077:
                log.warning(
                    "a secret file is readable by others; chmod 600 it", extra={"path": str(self.path)}
                )
            self._value = self.path.read_text(encoding="utf-8").strip()
            self._seen = key
        return self._value

    def _temp(self, text: str) -> Path:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return temp

    def create(self, text: str) -> str:
        """Store `text` unless the file exists already; returns what is stored now."""
        if self.path is None:
            if self._value is None:
                self._value = text
            return self._value
        temp = self._temp(text)
        try:
            os.link(temp, self.path)  # never replaces: two processes starting at once agree
        except FileExistsError:
            pass
        finally:
            temp.unlink()
        stored = self.read()
        if not stored:  # an empty file: as good as none
            self.replace(text)
            return text
        return stored

    def replace(self, text: str) -> None:
        if self.path is None:
            self._value = text
            return
        os.replace(self._temp(text), self.path)
        self.read()


class LoginToken:
    """The credential when no password is set: random, made at the first start, kept until rotated."""

    def __init__(self, state_dir: Path | None) -> None:
        self.file = StateFile(None if state_dir is None else state_dir / LOGIN_TOKEN_FILE)

    @property
    def stored(self) -> bool:
        return self.file.path is not None

    def current(self) -> str:
        try:
            return self.file.read() or self.file.create(secrets.token_urlsafe(32))
        except OSError as e:  # an unwritable state directory must not leave the admin locked out
            log.error(
                "cannot store the login token, so it lasts only until the next restart: %s",
                e.strerror or e,
                extra={"path": str(self.file.path)},
            )
            self.file = StateFile(None)
            return self.file.create(secrets.token_urlsafe(32))

    def rotate(self) -> str:
        token = secrets.token_urlsafe(32)
        self.file.replace(token)
        return token


class SessionEpoch:
    """A counter every session carries; a logout increments it, so every earlier session ends."""

    def __init__(self, state_dir: Path | None) -> None:
        self.file = StateFile(None if state_dir is None else state_dir / EPOCH_FILE)

    def value(self) -> int:
        try:
            text = self.file.read()
        except OSError:
            text = None
        try:
            return int(text or 0)
        except ValueError:
            return 0

    def bump(self) -> int:
        new = self.value() + 1
        try:
            self.file.replace(str(new))
        except OSError as e:
            log.error("cannot store the session epoch; logouts last until a restart: %s", e.strerror or e)
            self.file = StateFile(None)
            self.file.replace(str(new))
        return new


def login_url(server: ServerConfig, token: str, path: str = "/login") -> str:
    """The link a person on the gateway's machine opens: a wildcard bind address becomes 127.0.0.1."""
    host = server.host if server.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if server.tls_cert else "http"
    return f"{scheme}://{host}:{server.port}{path}?token={token}"


# -- failed logins ------------------------------------------------------------------------------------
def client_key(address: str) -> str:
    """What the limiter counts per: an IPv4 address, or an IPv6 /64 (one subscriber's allocation)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginLimiter:
    """Failed logins: `max_failures` within `window` seconds lock that client (an IPv4 address or an
    IPv6 /64) until the window has passed, and `global_max` failures from anywhere within the window
    lock every login, so rotating source addresses cannot guess faster either. Bounded: beyond
    `max_clients` the stalest clients are forgotten (the global budget still counts them)."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 300.0,
        max_clients: int = 4096,
        global_max: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_clients = max_clients
        self.global_max = global_max
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._recent: deque[float] = deque(maxlen=global_max)

    def __len__(self) -> int:
        return len(self._failures)

    def global_retry_after(self) -> float:
        now = self._clock()
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        if len(self._recent) < self.global_max:
            return 0.0
        return self._recent[0] + self.window - now

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may try now."""
        wait = self.global_retry_after()
        key = client_key(client)
        entry = self._failures.get(key)
        if entry is None:
            return wait
        started, count = entry
        left = started + self.window - self._clock()
        if left <= 0:
            del self._failures[key]
            return wait
        return max(wait, left if count >= self.max_failures else 0.0)

    def failed(self, client: str) -> None:
        now = self._clock()
        self._recent.append(now)
        key = client_key(client)
        started, count = self._failures.get(key, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        self._failures[key] = (started, count + 1)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client_key(client), None)


# -- sessions ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Principal:
    """Who an admin request acts as: the credential behind it and when it was last confirmed."""

    credential: str  # PASSWORD or LOGIN_TOKEN
    via: str  # "cookie", "bearer" (a session token) or "login-token" (the token itself)
    auth_time: float
    expires: float  # when the session ends (Unix time; inf for the login token itself)
    session: str = ""  # the session id (jti), "" for the login token itself

    def fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.auth_time <= REAUTH_WINDOW


class AdminAuth:
    """Issues and checks admin sessions against the admin config in force (it may be reloaded).

    `state_dir` holds the login token and the session epoch; None keeps both in memory."""

    def __init__(self, state_dir: Path | None = None, limiter: LoginLimiter | None = None) -> None:
        self.limiter = limiter or LoginLimiter()
        self.login_token = LoginToken(state_dir)
        self.epoch = SessionEpoch(state_dir)
        # Signs sessions when a password but no `jwt_secret` is set: valid for this process only.
        self._process_secret = secrets.token_bytes(32)

    @staticmethod
    def credential(cfg: AdminConfig) -> str:
        return PASSWORD if cfg.password else LOGIN_TOKEN

    def secret(self, cfg: AdminConfig) -> bytes:
        if cfg.jwt_secret:
            return cfg.jwt_secret.encode("utf-8")
        if not cfg.password:
            # Sessions then survive restarts as the token does, and end when it is rotated.
            return hmac.new(self.login_token.current().encode(), b"botgate sessions", hashlib.sha256).digest()
        return self._process_secret

    def _fingerprint(self, cfg: AdminConfig) -> str:
        if cfg.password:
            material = b"password:" + cfg.password.encode("utf-8")
        else:
            material = b"login-token:" + self.login_token.current().encode("utf-8")
        return _b64encode(hmac.new(self.secret(cfg), material, hashlib.sha256).digest()[:12])

    def check(self, cfg: AdminConfig, given: str) -> bool:
        """Is `given` the credential in force (the password, or the login token when none is set)?"""
        expected = cfg.password or self.login_token.current()
        return password_matches(given, expected)

    def is_login_token(self, cfg: AdminConfig, given: str) -> bool:
        return not cfg.password and password_matches(given, self.login_token.current())

    def issue(
        self, cfg: AdminConfig, now: float | None = None, auth_time: float | None = None
    ) -> tuple[str, float]:
        """A session for the admin; returns (token, expiry as a Unix time). `auth_time` (default:
        `now`) is when the credential was confirmed."""
        issued = time.time() if now is None else now
        expires = issued + cfg.token_ttl
        claims = {
            "sub": "admin",
            "iat": int(issued),
            "exp": int(expires),
            "auth_time": int(issued if auth_time is None else auth_time),
            "amr": self.credential(cfg),
            "pwd": self._fingerprint(cfg),
            "ep": self.epoch.value(),
            "jti": secrets.token_hex(8),
        }
        return encode(self.secret(cfg), claims), float(int(expires))

    def verify(self, cfg: AdminConfig, token: str, now: float | None = None) -> dict[str, Any]:
        claims = decode(self.secret(cfg), token, now)
        if not hmac.compare_digest(str(claims.get("pwd", "")), self._fingerprint(cfg)):
            what = "password" if cfg.password else "login token"
            raise TokenError(f"token was issued for another {what}")
        if claims.get("ep") != self.epoch.value():
            raise TokenError("token revoked (logged out)")
        iat, auth_time = claims.get("iat"), claims.get("auth_time")
        if not isinstance(iat, int) or not isinstance(auth_time, int):
            raise TokenError("malformed token")
        if claims["exp"] - iat > cfg.token_ttl + 1:  # only a leaked jwt_secret could mint one
            raise TokenError("token outlives [admin] token_ttl")
        return claims

    def principal(self, cfg: AdminConfig, token: str, via: str) -> Principal:
        """The admin behind a session token or the login token itself; raises `TokenError`."""
        if self.is_login_token(cfg, token):
            return Principal(LOGIN_TOKEN, "login-token", time.time(), float("inf"))
        claims = self.verify(cfg, token)
        return Principal(
            str(claims.get("amr", self.credential(cfg))),
            via,
            float(claims["auth_time"]),
            float(claims["exp"]),
            str(claims.get("jti", "")),
        )

    def logout(self) -> None:
        """End every session issued so far (a single admin identity: log out = everywhere)."""
        self.epoch.bump()

    @staticmethod
    def warn_if_ephemeral(cfg: AdminConfig) -> None:
        if cfg.password and not cfg.jwt_secret:
            log.warning(
                "admin jwt_secret is not set: using a random per-process secret, so logins do not "
                "survive a restart (set [admin] jwt_secret or BOTGATE_ADMIN__JWT_SECRET)"
            )
