"""The release facts ops rely on: pyproject's Python floor, and CHANGELOG.md naming the version
`run.py --version` reports (docs/deploy.md, "Upgrades and rollback")."""

from __future__ import annotations

import re
import tomllib

from gateway import __version__
from tests.process import ROOT


def test_requires_python_311() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_changelog_has_the_current_version() -> None:
    versions = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert versions[0] == "Unreleased"
    assert versions[1] == __version__, "the newest release in CHANGELOG.md is gateway.__version__"
