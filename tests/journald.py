"""A private systemd-journald, for tests that need the real one: what it makes of a service's
output (the "<N>" priority prefix, the identifier) and what `journalctl` then shows.

Runs as root in a mount namespace of its own, with a tmpfs on /run, so the host's /run and journal
are untouched:

    unshare --mount --propagation private python -m tests.journald QUERY... -- COMMAND...

COMMAND runs with stdout and stderr on one journal stream, as systemd connects a service: identifier
`botgate` (the unit's SyslogIdentifier=), level prefixes parsed (SyslogLevelPrefix=yes) and
JOURNAL_STREAM set to the stream's device:inode. Then each QUERY (a shell command, reading the journal
in JOURNAL_DIR) runs, and the driver prints their outputs as a JSON list.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.process import NotifySocket

JOURNALD = Path("/lib/systemd/systemd-journald")
JOURNAL_DIR = "/run/log/journal"
IDENTIFIER = "botgate"  # systemd/botgate.service: SyslogIdentifier=
# Volatile storage only, nothing from the kernel log, no forwarding, no rate limit (a test's burst
# must all arrive).
CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
"""
# What systemd does for a unit's stdout: JOURNAL_STREAM names the stream the process writes to.
AS_A_SERVICE = 'export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/$$/fd/1)"; exec "$@"'


def main(argv: list[str]) -> int:
    split = argv.index("--")
    queries, command = argv[:split], argv[split + 1 :]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True, timeout=10)
    Path("/run/systemd/journald.conf.d").mkdir(parents=True)
    Path("/run/systemd/journald.conf.d/test.conf").write_text(CONF)
    notify = NotifySocket()
    journald = subprocess.Popen(
        [str(JOURNALD)], env={**os.environ, "NOTIFY_SOCKET": notify.env_value}, stdout=subprocess.DEVNULL
    )
    try:
        notify.wait_for("READY=1")
        subprocess.run(
            [
                "systemd-cat",
                f"--identifier={IDENTIFIER}",
                "--level-prefix=true",
                "sh",
                "-c",
                AS_A_SERVICE,
                "sh",
                *command,
            ],
            check=True,
            timeout=60,
        )
        subprocess.run(["journalctl", "--sync"], check=True, timeout=30)
        outputs = [
            subprocess.run(["sh", "-c", q], capture_output=True, text=True, timeout=30, check=True).stdout
            for q in queries
        ]
    finally:
        journald.terminate()
        journald.wait(10)
        notify.close()
    sys.stdout.write(orjson.dumps(outputs).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
