"""Native TLS ([server] tls_cert/tls_key): HTTPS /healthz, and a renewed certificate picked up on SIGHUP."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.process import GatewayProcess, self_signed

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def served_certificate(port: int, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_https_healthz_and_certificate_renewal_on_sighup(
    spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    old_cert, old_key = self_signed(tmp_path, "old")
    new_cert, new_key = self_signed(tmp_path, "new")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    gw = spawn_gateway(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert f"STATUS=serving on https://127.0.0.1:{gw.port}" in gw.notify.received[-1]

    context = ssl.create_default_context(cafile=str(old_cert))
    with urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/healthz", context=context, timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == b'{"status": "alive"}'
    assert served_certificate(gw.port, old_cert) == pem_to_der(old_cert)

    # certbot-style renewal: files replaced in place, then `systemctl reload botgate`.
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    gw.signal(signal.SIGHUP)
    gw.notify.wait_for("RELOADING=1")
    assert gw.notify.receive()[0] == "READY=1"
    assert served_certificate(gw.port, new_cert) == pem_to_der(new_cert)
    assert gw.stop() == 0


def test_plain_http_to_the_tls_port_is_refused_cleanly(
    spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, "srv")
    gw = spawn_gateway(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(1024)
    assert not answer.startswith(b"HTTP/1.1 200")
    assert gw.stop() == 0
    assert "Traceback" not in gw.output()


def test_unreadable_key_is_a_config_error(
    spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    cert, _ = self_signed(tmp_path, "srv")
    gw = spawn_gateway(
        f'[server]\ntls_cert = "{cert}"\ntls_key = "{tmp_path / "missing.key"}"\n', start=False
    )
    assert gw.spawn().wait(30) == 2
    assert "server.tls_cert/tls_key: cannot load" in gw.stderr()
    assert "Traceback" not in gw.stderr()
