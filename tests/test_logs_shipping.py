"""Logs that ship (docs/logging.md): journald priorities per line, keys that Elasticsearch's ECS
templates accept, and shipper configs that read the fields the gateway writes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.logs import ECS_OBJECTS, JsonFormatter, syslog_priority
from tests import journald
from tests.debian import tool as debian_tool
from tests.log_keys import RECORD_ATTRIBUTES, LogKeys
from tests.process import ROOT, GatewayProcess

ECS_LIST = ROOT / "tests" / "data" / "ecs_fields.txt"
DOCS = ROOT / "docs" / "logging.md"
# What the formatter writes on every line, and on a line with a traceback.
FORMATTER_FIELDS = {"timestamp", "level", "logger", "message", "request_id", "user_id", "latency_ms",
                    "model_version", "exception"}  # fmt: skip


# -- the ECS list -----------------------------------------------------------------------------------
@cache
def ecs_fields() -> dict[str, str]:
    """Every ECS field name with its type, from the checked-in list."""
    rows = (line.split("\t") for line in ECS_LIST.read_text().splitlines() if line and not line.startswith("#"))
    return {name: kind for name, kind in rows}


@cache
def ecs_objects() -> frozenset[str]:
    """Top-level names that are objects in ECS: every field set (`host` of `host.name`) and the
    object-typed top-level fields (`labels`)."""
    fields = ecs_fields()
    sets = {name.split(".")[0] for name in fields if "." in name}
    typed = {name for name, kind in fields.items() if "." not in name and kind in ("object", "flattened", "nested")}
    return frozenset(sets | typed)


def test_the_ecs_list_is_the_one_cited() -> None:
    header = ECS_LIST.read_text().splitlines()[0]
    assert "ECS) 9.4.0" in header and "github.com/elastic/ecs" in ECS_LIST.read_text()[:400]
    fields = ecs_fields()
    assert len(fields) > 2000 and fields["@timestamp"] == "date" and fields["message"] == "match_only_text"
    assert {"event", "error", "host", "url", "client", "user", "log", "process", "service", "http"} <= ecs_objects()


def test_the_formatter_guards_exactly_the_ecs_objects() -> None:
    assert ecs_objects() == ECS_OBJECTS


# -- lines the formatter writes ---------------------------------------------------------------------
def formatted(extra: dict[str, Any] | None = None, level: int = logging.INFO, **kwargs: Any) -> str:
    record = logging.makeLogRecord({"name": "gateway.test", "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": "something %s", "args": ("happened",), **(extra or {})})  # fmt: skip
    return JsonFormatter(**kwargs).format(record)


def ecs_conflicts(line: dict[str, Any]) -> list[str]:
    """The keys of `line` that Elasticsearch's ECS templates would reject the line for."""
    return [key for key, value in line.items() if key.split(".")[0] in ecs_objects() and not isinstance(value, dict)]


def test_no_line_puts_a_value_where_ecs_has_an_object() -> None:
    """Whatever a record carries (a library's extra, a key added later), the line is accepted: a
    value under an ECS object's name is written as `<name>_value`, an object stays where it is."""
    for name in sorted(ecs_objects()):
        line = orjson.loads(formatted({name: "a text", "platform": "web"}))
        assert not ecs_conflicts(line), line
        if name not in RECORD_ATTRIBUTES:  # `process` (the pid) is the record's own, never written
            assert line[f"{name}_value"] == "a text" and line["platform"] == "web"
            assert orjson.loads(formatted({name: {"id": 1}}))[name] == {"id": 1}
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    line = orjson.loads(formatted({"exc_info": exc_info}, level=logging.ERROR))
    assert set(line) == FORMATTER_FIELDS and not ecs_conflicts(line)
    assert line["message"] == "something happened" and "ValueError: boom" in line["exception"]


# -- the gateway's own keys, read from the source ---------------------------------------------------
@cache
def log_keys() -> LogKeys:
    return LogKeys()


def test_no_key_the_gateway_logs_collides_with_ecs() -> None:
    found = log_keys()
    assert not found.unresolved, "extra= the scan cannot follow (use a dict literal or a fields helper)"
    public = {key: where for key, where in found.keys.items() if not key.startswith("_")}
    # The scan reaches the keys behind every kind of helper (or it would pass on nothing):
    # fields(message), audit(**fields) with _who(request), request[AUDIT_DETAIL], a filter's record.x.
    assert {"request_id", "user_id", "latency_ms", "model_version", "action", "result", "client_ip",
            "peer", "status", "conversation", "outbox_id", "error_message", "listen_url", "suppressed",
            "config", "restart_keys", "os_user"} <= set(public)  # fmt: skip
    colliding = {key: sorted(where) for key, where in public.items() if key.split(".")[0] in ecs_objects()}
    assert not colliding
    odd = sorted(key for key in public if not key.isidentifier())
    assert not odd, "a dotted key would be read as an ECS path"


# -- journald priority ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
     (45, 3), (25, 6), (5, 7), (60, 2)],
)  # fmt: skip
def test_level_to_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority
    line = formatted(level=level, priority_prefix=True)
    assert line.startswith(f"<{priority}>{{") and orjson.loads(line[len(f"<{priority}>") :])["message"]


def test_the_docs_priority_table_is_the_mapping() -> None:
    rows = re.findall(r"^\| `([A-Z]+)` \| (\d) \| `(\w+)` \|$", DOCS.read_text(), re.M)
    assert [name for name, _, _ in rows] == ["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
    for name, priority, _ in rows:
        assert syslog_priority(logging.getLevelName(name)) == int(priority)


def test_the_unit_names_its_lines_and_lets_journald_read_the_prefix() -> None:
    unit = (ROOT / "systemd" / "botgate.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["SyslogIdentifier"] == journald.IDENTIFIER  # the identifier the journald test uses
    assert settings.get("SyslogLevelPrefix", "yes") == "yes"
    assert "StandardOutput" not in settings  # stdout goes to the journal (the default)


LOG_EVERY_LEVEL = (
    "import logging; from gateway.logs import setup_logging; setup_logging('DEBUG');"
    "log = logging.getLogger('gateway.test');"
    "log.debug('d'); log.info('i'); log.warning('w'); log.error('e'); log.critical('c')"
)


def run_logging(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """setup_logging in a process of its own, stdout into a file; JOURNAL_STREAM as given ("self":
    the file's own device:inode, as systemd sets it for its journal stream)."""
    out = tmp_path / "stdout.log"
    out.touch()
    st = os.stat(out)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal_stream == "self" else journal_stream
    with out.open("wb") as stdout:
        subprocess.run(
            [sys.executable, "-c", LOG_EVERY_LEVEL], cwd=ROOT, env=env, stdout=stdout, check=True, timeout=30
        )
    return out.read_text().splitlines()


def test_on_the_journal_stream_each_line_carries_its_priority(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, "self")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [orjson.loads(line[3:])["message"] for line in lines] == ["d", "i", "w", "e", "c"]


@pytest.mark.parametrize("journal_stream", [None, "1:2", "garbage", ""])
def test_elsewhere_lines_are_clean_json(tmp_path: Path, journal_stream: str | None) -> None:
    """A terminal, a file, a pipe into jq: no prefix, also when JOURNAL_STREAM was inherited from a
    service whose output was redirected (it names another stream)."""
    lines = run_logging(tmp_path, journal_stream)
    assert [orjson.loads(line)["level"] for line in lines] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def test_the_gateway_on_a_journal_stream(tmp_path: Path) -> None:
    """`python run.py` as the unit starts it: every stdout line is "<N>" and a JSON object."""
    gw = GatewayProcess(tmp_path)
    gw.stdout_path.touch()
    st = os.stat(gw.stdout_path)
    gw.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        gw.start()
        assert gw.stop() == 0
    finally:
        gw.kill()
    lines = gw.stdout().splitlines()
    assert lines and all(re.match(r"<[2-7]>\{", line) for line in lines), lines
    starting = next(orjson.loads(line[3:]) for line in lines if '"message":"starting"' in line)
    assert lines[0].startswith("<6>") and starting["listen_host"] == "127.0.0.1"


# -- the real journald ------------------------------------------------------------------------------
def _journald_missing() -> str:
    if os.geteuid() != 0:
        return "needs root (a private journald in a mount namespace)"
    for tool in ("unshare", "systemd-cat", "journalctl", "jq", "stat"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian packages: util-linux, systemd, jq, coreutils)"
    if not journald.JOURNALD.exists():
        return f"{journald.JOURNALD} not installed (Debian package: systemd)"
    return ""


def documented_recipe() -> str:
    """The `journalctl -u botgate -o cat | jq` recipe docs/logging.md gives."""
    match = re.search(r"^(journalctl -u botgate -o cat \| jq -R .+)$", DOCS.read_text(), re.M)
    assert match, "docs/logging.md: no `journalctl -u botgate -o cat | jq -R ...` recipe"
    return match.group(1)


WRITER = (
    "import logging, sys; from gateway.logs import setup_logging; setup_logging('INFO');"
    "log = logging.getLogger('gateway.test');"
    "log.info('answered', extra={'request_id': 'r1'}); log.warning('connection lost', extra={'request_id': 'r2'});"
    "log.error('model failed', extra={'request_id': 'r3'}); print('config error: not JSON', file=sys.stderr)"
)


def test_the_slowest_answers_recipe_sorts_by_latency() -> None:
    """docs/logging.md's "slowest answers" one-liner, on the lines the gateway writes: the slowest
    first (a line `sort -n` cannot read a number from, such as a JSON array, would not sort at all)."""
    jq = debian_tool("jq", "jq")
    match = re.search(r"^# the slowest answers today\njournalctl [^|]+\| (jq .+)$", DOCS.read_text(), re.M)
    assert match, "docs/logging.md: no 'the slowest answers today' recipe"
    lines = [
        orjson.dumps({"message": "answered", "latency_ms": ms, "request_id": f"r{ms}"}).decode()
        for ms in (9.5, 120.0, 30.25)
    ] + ['{"message":"connection lost","latency_ms":null}', "Starting botgate.service - botgate chat gateway..."]
    result = subprocess.run(
        ["sh", "-c", match.group(1).replace("jq ", f"{jq} ", 1)],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split()[-1] for line in result.stdout.splitlines()] == ["r120.0", "r30.25", "r9.5"]


@pytest.mark.skipif(bool(_journald_missing()), reason=_journald_missing() or "-")
def test_journalctl_finds_warnings_and_the_recipe_reads_the_journal() -> None:
    """Through the real systemd-journald: `-p warning` finds the warnings and errors, `-o cat`
    shows bare JSON, and the documented jq recipe skips a line that is not JSON (systemd's own,
    or a start-up error on stderr) instead of dying on it."""
    # -u botgate needs systemd as PID 1 (it matches the unit's cgroup); the same lines by their
    # identifier (SyslogIdentifier=botgate).
    where = f"journalctl -D {journald.JOURNAL_DIR} -t {journald.IDENTIFIER}"
    recipe = documented_recipe().replace("journalctl -u botgate", where)
    queries = [
        f"{where} -p warning -o cat",
        f"{where} -o json",
        recipe,
        f"{where} -o cat | jq -c . || echo jq failed: $?",
    ]
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "tests.journald", *queries, "--",
         sys.executable, "-c", WRITER],
        cwd=ROOT, capture_output=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    warnings, entries, recipe_out, plain_jq = orjson.loads(result.stdout)
    assert [orjson.loads(line)["message"] for line in warnings.splitlines()] == ["connection lost", "model failed"]
    priorities = {orjson.loads(e)["MESSAGE"]: orjson.loads(e)["PRIORITY"] for e in entries.splitlines()}
    assert [p for m, p in priorities.items() if m.startswith("{")] == ["6", "4", "3"]
    assert priorities["config error: not JSON"] == "6"  # stderr: plain text, the default priority
    assert all(orjson.loads(e)["SYSLOG_IDENTIFIER"] == "botgate" for e in entries.splitlines())
    # The recipe from the docs shows every JSON line and skips the plain one; a bare `| jq` dies there.
    assert [line["message"] for line in json_stream(recipe_out)] == ["answered", "connection lost", "model failed"]
    assert "jq failed" in plain_jq


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON values jq printed one after the other (pretty-printed over several lines)."""
    decoder, values, at, text = json.JSONDecoder(), [], 0, text.strip()
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        at += len(text[at:]) - len(text[at:].lstrip())  # the newline between two values
    return values


# -- shipper configs --------------------------------------------------------------------------------
def mapping_table() -> list[tuple[str, str]]:
    """docs/logging.md's field table: (botgate field, ECS field or "")."""
    text = DOCS.read_text()
    table = text.split("<!-- field mapping -->", 2)[1]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            ecs = re.fullmatch(r"`([\w.@]+)`", cells[2])
            rows += [(name, ecs.group(1) if ecs else "") for name in re.findall(r"`([^`]+)`", cells[0])]
    return rows


def produced_fields() -> set[str]:
    return FORMATTER_FIELDS | set(log_keys().keys)


def test_every_documented_field_is_produced_and_collides_with_nothing() -> None:
    rows = mapping_table()
    assert len(rows) >= 15
    documented = {name for name, _ in rows}
    assert not documented - produced_fields(), "documented but never logged"
    assert documented >= FORMATTER_FIELDS  # at least every field of every line
    assert not {name for name in documented if name.split(".")[0] in ecs_objects()}
    for name, ecs in rows:
        if ecs:
            assert ecs in ecs_fields(), f"{name} -> {ecs}: not an ECS field"


def filebeat() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "filebeat.yml").read_text())
    return config


def processors(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for entry in config["filebeat.inputs"][0]["processors"]:
        [(name, settings)] = entry.items()
        yield name, settings


def test_filebeat_reads_the_service_and_decodes_into_the_root() -> None:
    config = filebeat()
    [source] = config["filebeat.inputs"]
    assert source["type"] == "journald" and source["id"] == "botgate"
    assert source["include_matches.match"] == ["_SYSTEMD_UNIT=botgate.service"]  # the unit's own lines
    assert (ROOT / "systemd" / "botgate.service").exists()
    steps = dict(processors(config))
    decode = steps["decode_json_fields"]
    assert decode["fields"] == ["message"] and decode["target"] == "" and decode["overwrite_keys"] is True
    # Every rename is from a field botgate writes to the ECS field docs/logging.md names.
    table = dict(mapping_table())
    renames = [(r["from"], r["to"]) for r in steps["rename"]["fields"]]
    assert renames and all(table.get(src) == dst and dst in ecs_fields() for src, dst in renames), renames
    assert steps["rename"]["ignore_missing"] is True  # a line without `exception` is still shipped
    stamp = steps["timestamp"]
    assert stamp["field"] == "timestamp" and stamp["field"] in FORMATTER_FIELDS
    # The layout's sample has the shape of the formatter's timestamps.
    written = orjson.loads(formatted())["timestamp"]
    assert [re.sub(r"\d", "0", s) for s in stamp["test"]] == [re.sub(r"\d", "0", written)]


def vector() -> dict[str, Any]:
    with (ROOT / "deploy" / "vector.toml").open("rb") as f:
        return tomllib.load(f)


def test_vector_reads_the_service_and_labels_only_low_cardinality_fields() -> None:
    config = vector()
    source = config["sources"]["botgate_journal"]
    assert source["type"] == "journald" and source["include_units"] == ["botgate.service"]
    remap = config["transforms"]["botgate_lines"]
    assert (
        remap["type"] == "remap"
        and remap["inputs"] == ["botgate_journal"]
        and "parse_json(.message)" in remap["source"]
    )
    sink = config["sinks"]["loki"]
    assert sink["inputs"] == ["botgate_lines"]
    labelled = {m for value in sink["labels"].values() for m in re.findall(r"\{\{\s*(\w+)\s*\}\}", value)}
    assert labelled == {"level", "logger"} and labelled <= FORMATTER_FIELDS  # on every line, few values


@pytest.mark.skipif(shutil.which("vector") is None, reason="no vector binary (not packaged in Debian 12)")
def test_vector_validates_the_config() -> None:
    vector_bin = shutil.which("vector")
    assert vector_bin is not None
    result = subprocess.run([vector_bin, "validate", "--no-environment", str(ROOT / "deploy" / "vector.toml")],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
