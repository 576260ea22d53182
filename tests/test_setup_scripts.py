"""The newcomer's commands (README "Quick start"): `.ci/test-packages`, which `./botgate test` runs
first, names the missing Debian packages (or installs them as root), and `./botgate` refuses an
interpreter older than 3.11 saying what to do. Run against a fake PATH: no apt, nothing installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.process import ROOT

PACKAGES = ROOT / ".ci" / "test-packages"
AS_3_10 = "import sys; sys.version_info = (3, 10, 12); exec(sys.argv[1])"  # runs `-c CODE` as if on 3.10


def needed() -> dict[str, str]:
    """package -> command, as the script lists them."""
    block = re.search(r'NEEDED="\n(.*?)"', PACKAGES.read_text(), flags=re.S)
    assert block is not None
    return dict(line.split(":", 1) for line in block.group(1).split())


def fake_bin(tmp_path: Path, commands: list[str], uid: int) -> Path:
    """A PATH holding only `commands` (doing nothing), an `id` answering `uid`, and an apt-get that
    logs its arguments and "installs" a package by creating the command it provides."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for command in commands:
        (bin_dir / command).symlink_to("/bin/true")
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    provides = " ".join(f"{package}:{command}" for package, command in needed().items())
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path / "apt.log"}\n'
        f'[ "$1" = install ] || exit 0\n'
        f"for arg; do for pair in {provides}; do\n"
        f'  [ "$arg" = "${{pair%%:*}}" ] && [ -n "$INSTALLS" ] && /bin/ln -s /bin/true {bin_dir}/"${{pair#*:}}"\n'
        "done; done; exit 0\n"
    )
    for script in ("id", "apt-get"):
        (bin_dir / script).chmod(0o755)
    return bin_dir


def check(bin_dir: Path, *args: str, installs: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "INSTALLS": "1" if installs else ""}
    return subprocess.run(
        ["/bin/sh", str(PACKAGES), *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def apt_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_lists_the_packages_ci_installed() -> None:
    assert {"redis-server", "chromium", "prometheus", "prometheus-alertmanager", "systemd", "wrk", "nginx"} <= set(
        needed()
    )


# Commands tests look for that are not .ci/test-packages' business: in every Debian system
# (util-linux, coreutils, systemd's journalctl), alternatives to a listed one (Debian names
# Alertmanager's binary prometheus-alertmanager), or not in Debian 12 at all (docker, vector).
NOT_DEBIAN_TEST_PACKAGES = {"prlimit", "unshare", "stat", "journalctl", "systemd-cat", "alertmanager",
                            "prometheus-alertmanager", "docker", "vector"}  # fmt: skip


def test_every_command_a_test_skips_without_is_a_listed_package() -> None:
    """A test that skips when a command is missing must have it installed by CI, or a run without
    it reads green (the TLS tests without openssl, the journal recipe without jq)."""
    source = "\n".join(path.read_text() for path in (ROOT / "tests").glob("*.py"))
    looked_for = set(re.findall(r'\b(?:which|tool|debian_tool)\("([\w.-]+)"', source))
    for group in re.findall(r"for tool in \(([^)]*)\)", source):
        looked_for |= set(re.findall(r'"([\w.-]+)"', group))
    assert looked_for - set(needed().values()) - NOT_DEBIAN_TEST_PACKAGES == set()


def test_missing_packages_are_named_and_nothing_is_installed_without_root(tmp_path: Path) -> None:
    present = [command for package, command in needed().items() if package not in ("wrk", "nginx")]
    result = check(fake_bin(tmp_path, present, uid=1000), "--install")
    assert result.returncode == 1
    assert "missing Debian packages the tests need: wrk nginx" in result.stderr
    assert "apt-get install -y --no-install-recommends wrk nginx" in result.stderr
    assert apt_log(tmp_path) == []


def test_as_root_the_missing_packages_are_installed(tmp_path: Path) -> None:
    present = [command for package, command in needed().items() if package != "chromium"]
    result = check(fake_bin(tmp_path, present, uid=0), "--install")
    assert result.returncode == 0, result.stderr
    log = apt_log(tmp_path)
    assert log[0].startswith("update")
    assert log[1].startswith("install") and log[1].split()[-1] == "chromium"


def test_as_root_a_package_that_did_not_install_still_fails(tmp_path: Path) -> None:
    present = [command for package, command in needed().items() if package != "wrk"]
    result = check(fake_bin(tmp_path, present, uid=0), "--install", installs=False)
    assert result.returncode == 1
    assert "missing Debian packages the tests need: wrk" in result.stderr


def test_without_install_it_only_checks(tmp_path: Path) -> None:
    result = check(fake_bin(tmp_path, [], uid=0))
    assert result.returncode == 1
    assert apt_log(tmp_path) == []
    assert check(fake_bin(tmp_path / "all", list(needed().values()), uid=1000)).returncode == 0


def test_botgate_refuses_python_older_than_3_11_and_says_what_to_do(tmp_path: Path) -> None:
    # A fresh clone (no .venv) whose python3 is Ubuntu 22.04's.
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "botgate", clone / "botgate")
    fake = tmp_path / "python3.10"
    # Python 3.10 as far as the script can tell: its version, and code run under that version_info.
    fake.write_text(
        '#!/bin/sh\n[ "$1" = -V ] && { echo "Python 3.10.12"; exit 0; }\n'
        f'[ "$1" = -c ] && exec {sys.executable} -c "{AS_3_10}" "$2"\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    result = subprocess.run(
        ["/bin/sh", str(clone / "botgate"), "run"], capture_output=True, text=True, timeout=30, env=env, check=False
    )
    assert result.returncode == 1
    assert "needs Python 3.11 or newer" in result.stderr and "Python 3.10.12" in result.stderr
    assert "PYTHON=python3.11" in result.stderr
    assert not (clone / ".venv").exists()


def test_botgate_names_python3_venv_when_pip_bootstrap_is_missing(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "botgate", clone / "botgate")
    bin_dir = fake_bin(tmp_path, [], uid=1000)  # not root: it must not run apt-get
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(fake)}
    result = subprocess.run(
        ["/bin/sh", str(clone / "botgate"), "run"], capture_output=True, text=True, timeout=30, env=env, check=False
    )
    assert result.returncode == 1
    assert "missing: python3-venv" in result.stderr and "apt-get install -y python3-venv" in result.stderr
    assert apt_log(tmp_path) == []
