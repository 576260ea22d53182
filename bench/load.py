"""HTTP load for the webhook scenario: `wrk` with a Lua script signing DingTalk callbacks (a Python
client would itself be the bottleneck on 2 cores, so there is no fallback: scenario 1 needs wrk)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from .context import BenchError
from .dingtalk import chatbot_payload, sign
from .env import Cores, wrk_path

CONNECTIONS = 64
CONVERSATIONS = 1000  # messages spread over this many 1:1 conversations


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def signed_headers() -> dict[str, str]:
    """A timestamp is valid for `[dingtalk] max_message_age` (600 s), so one timestamp + sign serves a
    whole run (the body's createAt is as old: runs are far shorter)."""
    ts = str(int(time.time() * 1000))
    return {"Content-Type": "application/json", "timestamp": ts, "sign": sign(ts)}


def body_template(webhook: str) -> tuple[str, list[str]]:
    """The callback JSON with `%s` holes, and which variable fills each hole (in order)."""
    payload = chatbot_payload("@@ID@@", "@@CONV@@", "benchmark message @@ID@@", webhook + "?session=@@CONV@@")
    text = orjson.dumps(payload).decode().replace("%", "%%")
    order = [m.group(1).lower() for m in re.finditer(r"@@(ID|CONV)@@", text)]
    return re.sub(r"@@(ID|CONV)@@", "%s", text), order


LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
  prefix = args[1] .. "t" .. tostring(tid) .. "n"
end
local headers = {@HEADERS@}
local template = [==[@TEMPLATE@]==]
function request()
  counter = counter + 1
  local id = prefix .. counter
  local conv = "c" .. tostring(counter % @CONVERSATIONS@)
  return wrk.format("POST", "@PATH@", headers, string.format(template, @ARGS@))
end
"""


def lua_script(path: str, webhook: str) -> str:
    template, order = body_template(webhook)
    headers = ", ".join(f'["{k}"] = "{v}"' for k, v in signed_headers().items())
    return (
        LUA.replace("@HEADERS@", headers)
        .replace("@TEMPLATE@", template)
        .replace("@CONVERSATIONS@", str(CONVERSATIONS))
        .replace("@PATH@", path)
        .replace("@ARGS@", ", ".join(order))
    )


_salt = itertools.count()


async def run_load(
    url: str, path: str, webhook: str, seconds: float, cores: Cores, workdir: Path
) -> LoadResult:
    """`seconds` of signed webhook requests from wrk on the load cores."""
    wrk = wrk_path()
    if wrk is None:
        raise BenchError("scenario 1 needs wrk (Debian: apt-get install wrk)")
    script = workdir / "webhook.lua"
    script.write_text(lua_script(path, webhook))
    salt = f"r{os.getpid()}x{next(_salt)}"  # distinct msgIds across runs against one gateway
    load = sorted(cores.load)
    proc = await asyncio.create_subprocess_exec(
        "taskset",
        "-c",
        ",".join(map(str, load)),
        wrk,
        f"-t{len(load)}",
        f"-c{CONNECTIONS}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        salt,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-500:]}")
    return parse_wrk(text)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text: str) -> LoadResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if total is None:
        raise RuntimeError(f"unreadable wrk output: {text[-500:]}")
    seconds = _ms(total.group(2), total.group(3)) / 1000
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    pct = {
        m.group(1): _ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    return LoadResult(
        requests=int(total.group(1)),
        seconds=seconds,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        p50_ms=pct.get("50"),
        p99_ms=pct.get("99"),
    )
