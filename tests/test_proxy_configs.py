"""deploy/nginx.conf is a sites-available snippet: `nginx -t` accepts it inside a main config that
includes it the way Debian's /etc/nginx/nginx.conf includes sites-enabled/*, and not on its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.debian import tool
from tests.process import ROOT, self_signed

SNIPPET = ROOT / "deploy" / "nginx.conf"
CERT = "/etc/letsencrypt/live/bot.example.com/fullchain.pem"
KEY = "/etc/letsencrypt/live/bot.example.com/privkey.pem"


def main_config(prefix: Path) -> Path:
    """What Debian's nginx.conf amounts to for this purpose: an http block including sites-enabled/*."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {prefix / kind};" for kind in kinds)
    path = prefix / "nginx.conf"
    path.write_text(
        f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'};\nevents {{}}\n"
        f"http {{\n  access_log off;\n  {temp}\n  include {prefix / 'sites-enabled'}/*;\n}}\n"
    )
    return path


def nginx_test(nginx: str, config: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nginx, "-t", "-q", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_nginx_accepts_the_snippet_inside_a_main_config(tmp_path: Path) -> None:
    nginx = tool("nginx", "nginx")
    # The 443 server needs its certificate to exist (certbot makes it; docs/deploy.md, TLS).
    cert, key = self_signed(tmp_path, "bot.example.com")
    sites = tmp_path / "sites-enabled"
    sites.mkdir()
    (sites / "botgate").write_text(SNIPPET.read_text().replace(CERT, str(cert)).replace(KEY, str(key)))
    result = nginx_test(nginx, main_config(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_snippet_is_not_a_main_config(tmp_path: Path) -> None:
    nginx = tool("nginx", "nginx")
    result = nginx_test(nginx, SNIPPET, tmp_path)
    assert result.returncode != 0
    assert "not allowed here" in result.stderr  # why docs/deploy.md says: sites-available, not nginx -c
