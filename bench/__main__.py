"""`python -m bench [--quick] [--only N ...] [--out PATH] [--json PATH]`: run the scenarios, print the
table, (in full mode) write BENCHMARKS.md and (with --json) every row as JSON. Exit 1 only when
something is broken, never for a missed target."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import answers, cards, findings, growth, ingress, latency, micro, recovery, resources, scaleout, stream
from .context import BenchError, Context
from .env import ROOT, load_average, machine_facts, pin_self, plan_cores, raise_fd_limit
from .report import Row, as_json, markdown, table
from .servers import ServerError

Scenario = Callable[[Context], Awaitable[list[Row]]]
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "1": ("webhook ingress", ingress.webhook),
    "2": ("stream ingress", stream.stream),
    "3": ("overhead + burst (3, 4)", latency.run),
    "5": ("memory", resources.memory),
    "6": ("recovery", recovery.run),
    "7": ("startup + idle memory (7, 5)", resources.startup),
    "8": ("hot-path costs", micro.run),
    "9": ("card streaming", cards.run),
    "10": ("state growth", growth.run),
    "11": ("scale-out on Redis", scaleout.run),
    "12": ("answers per core", answers.run),
}


def setup_lines(ctx: Context) -> list[str]:
    threads = len(ctx.cores.load)  # wrk -t: one thread per load core
    return [
        f"Cores: {ctx.cores.describe()} (os.sched_setaffinity); every server under test, reference "
        "or gateway, runs alone on the server core; the load generator and all doubles share the other.",
        "Gateway: `python run.py --config <tmp>/config.toml` with secrets in BOTGATE_ environment "
        'variables, `[log] level = "INFO"` (JSON lines to a file), host 127.0.0.1. Differences from the '
        "shipped defaults: `[dispatcher] max_concurrency = 4096` (default 64: a 2,000-message burst "
        "would take 2000/64 model-times), `max_queue = 1000000` (throughput runs never answer busy), "
        "`drain_timeout = 1`, `[model] max_retries = 0`, `[limits] per_user_per_minute = 0`, "
        "`per_conversation_per_minute = 0` (a benchmark floods on purpose).",
        f"Webhook load: wrk, {threads} thread{'s' if threads > 1 else ''}, {ingress.CONNECTIONS} "
        "connections, a Lua script signing every request with the DingTalk `timestamp`/`sign` headers "
        "and giving each a distinct msgId (1,000 conversations)",
        "Model doubles: throughput scenarios use an instant OpenAI-compatible double (canned SSE, "
        "~400-character answer; replies are produced asynchronously and compete for the gateway's core "
        "during the run); latency scenarios use tests/doubles/openai.py answering after 1 s.",
        "Doubles for DingTalk (open-connection, Stream websocket, sessionWebhook) and Feishu (ws endpoint, "
        "protobuf frames, open APIs) follow docs/protocols/; high-rate HTTP sinks are raw asyncio "
        "protocols so the load generator's core is not the bottleneck.",
    ]


async def run_all(ctx: Context, only: list[str]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    errors: list[str] = []
    for key, (title, scenario) in SCENARIOS.items():
        if only and key not in only:
            continue
        started = time.monotonic()
        print(f"== {key}: {title} ...", flush=True)
        try:
            got = await scenario(ctx)
        except (BenchError, ServerError, OSError, RuntimeError, AssertionError, TimeoutError) as e:
            errors.append(f"{title}: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        rows += got
        print(table(got), flush=True)
        print(f"   ({time.monotonic() - started:.1f} s)", flush=True)
    rows.sort(key=lambda r: int(r.scenario.split(".", 1)[0]))  # 2 before 10
    findings.explain(rows)
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: proves the harness (CI)")
    parser.add_argument("--only", nargs="*", default=[], choices=list(SCENARIOS), help="run these scenarios")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="report file (full mode)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON (tests/test_bench.py)")
    parser.add_argument("--label", default="", help="a line for the top of BENCHMARKS.md (e.g. why this run)")
    args = parser.parse_args(argv)

    raise_fd_limit()
    cores = plan_cores()
    pin_self(cores)
    workdir = Path(tempfile.mkdtemp(prefix="botgate-bench-"))
    ctx = Context(cores, workdir, args.quick)
    started = time.monotonic()
    load_before = load_average()
    try:
        rows, errors = asyncio.run(run_all(ctx, args.only))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    print(
        f"\n{len(rows)} rows in {time.monotonic() - started:.1f} s ({'quick' if args.quick else 'full'} mode)"
    )
    if not args.quick:
        command = "python -m bench" + (f" --only {' '.join(args.only)}" if args.only else "")
        facts = machine_facts(len(cores.server | cores.load))
        facts["load average (1 min)"] = (
            f"{load_before} at the start, {load_average()} at the end (2 = both cores busy)"
        )
        facts["duration"] = f"{time.monotonic() - started:.0f} s"
        text = markdown(rows, facts, setup_lines(ctx), command, args.label)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(as_json(rows, errors, args.quick))
        print(f"wrote {args.json}")
    if args.keep:
        print(f"work directory kept: {workdir}")
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
