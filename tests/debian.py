"""A Debian tool a test needs: its path, or the test is skipped naming the package, and in CI
(`CI` set, as .ci/run does) it fails instead, so a missing package cannot leave a green run
(`.ci/test-packages` lists and installs them)."""

from __future__ import annotations

import os
import shutil

import pytest


def tool(command: str, package: str) -> str:
    path = shutil.which(command)
    if path is not None:
        return path
    why = f"{command} is not installed (Debian package {package}; .ci/test-packages --install)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
