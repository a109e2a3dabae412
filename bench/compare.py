"""Run every workload against the project and the baseline, and print one table with the ratio.

    .venv/bin/python bench/compare.py --runs 3
    .venv/bin/python bench/compare.py --runs 1 --only fanout-saturated fanout-steady
    .venv/bin/python bench/compare.py --sockets 100 --messages 20 --duration 5 --frames 5   (a quick look)

Each workload runs as its own benchmark script (a subprocess, with --json-out), project first,
then baseline. Figures are the median of --runs runs, with min-max. Ratio = project / baseline.
The raw JSON of every script lands in bench/results/.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.common import BENCH, PYTHON, ROOT, log

RESULTS = BENCH / "results"
# A script that has not finished after this long is stopped (its own phases are bounded too).
SCRIPT_TIMEOUT = 3600

WORKLOADS: dict[str, dict[str, Any]] = {
    "fanout-saturated": {
        "script": "fanout.py",
        "metrics": {
            "deliveries_per_s": "deliveries/s",
            "latency_p50_ms": "latency p50 ms",
            "latency_p99_ms": "latency p99 ms",
            "latency_max_ms": "latency max ms",
            "publish_per_s": "publish requests/s",
            "lost": "lost",
            "duplicates": "duplicates",
            "out_of_order": "out of order",
            "cpu_us_per_delivery": "server CPU us/delivery",
            "rss_per_conn_kib": "server RSS/conn KiB",
        },
    },
    "fanout-steady": {
        "script": "fanout.py",
        "metrics": {
            "latency_p50_ms": "latency p50 ms",
            "latency_p99_ms": "latency p99 ms",
            "latency_max_ms": "latency max ms",
            "lost": "lost",
            "duplicates": "duplicates",
            "out_of_order": "out of order",
            "rss_per_conn_kib": "server RSS/conn KiB",
        },
    },
    "inbound": {
        "script": "inbound.py",
        "metrics": {
            "frames_per_s": "echoes/s",
            "rtt_p50_ms": "round trip p50 ms",
            "rtt_p99_ms": "round trip p99 ms",
            "receipt_p50_ms": "send -> receipt p50 ms",
            "cpu_ms_per_echo": "CPU ms/echo (webs+workers)",
            "total_cpu_ms_per_echo": "CPU ms/echo (+ PostgreSQL, broker)",
            "lost": "lost echoes",
            "duplicates": "duplicate echoes",
            "worker_1_share_pct": "worker-1 share %",
        },
    },
    "publish-api": {
        "script": "publish_api.py",
        "metrics": {
            "requests_per_s": "requests/s",
            "latency_p50_ms": "latency p50 ms",
            "latency_p99_ms": "latency p99 ms",
            "server_cpu_ms_per_request": "server CPU ms/request",
        },
    },
    # Single publishes with 10 sockets on the topic (project: the fast path; baseline: its bare
    # async view), and batches of 100 messages to 100 users' sockets against the baseline's single
    # publishes: messages/s over its requests/s (publish_api.py --side-by-side runs every variant,
    # the baseline's DRF view too, in turns).
    "publish-sockets": {
        "script": "publish_api.py",
        "metrics": {
            "requests_per_s": "requests/s",
            "latency_p50_ms": "latency p50 ms",
            "latency_p99_ms": "latency p99 ms",
            "server_cpu_ms_per_request": "server CPU ms/request",
            "delivery_p99_ms": "delivery p99 ms",
            "lost": "lost",
            "duplicates": "duplicates",
            "out_of_order": "out of order",
        },
    },
    "publish-batch": {
        "script": "publish_api.py",
        "metrics": {
            "messages_per_s": "messages/s (baseline: single requests/s)",
            "server_cpu_us_per_message": "server CPU us/message",
            "delivery_p50_ms": "delivery p50 ms",
            "delivery_p99_ms": "delivery p99 ms",
            "lost": "lost",
            "duplicates": "duplicates",
            "out_of_order": "out of order",
        },
    },
    "idle": {
        "script": "fanout.py",
        "metrics": {
            "rss_per_idle_socket_kib": "server RSS/idle socket KiB",
            "open_seconds": "seconds to open",
        },
    },
    # Project only (no baseline counterpart): `--only presence` / `--only routing`.
    "presence": {
        "script": "presence.py",
        "project_only": True,
        "metrics": {
            "frame_p50_ms": "presence frame p50 ms (10,000 members)",
            "frame_p99_ms": "presence frame p99 ms",
            "frame_cpu_ms_per_answer": "web CPU ms/answer",
            "frame_pg_cpu_ms_per_answer": "PostgreSQL CPU ms/answer",
            "api_p50_ms": "GET presence p50 ms",
            "api_p99_ms": "GET presence p99 ms",
            "join_p50_ms": "join latency p50 ms",
            "join_p99_ms": "join latency p99 ms",
            "leave_p50_ms": "leave latency p50 ms",
            "leave_p99_ms": "leave latency p99 ms",
            "missing_events": "missing joins/leaves",
            "duplicate_events": "duplicate joins/leaves",
        },
    },
    "routing": {
        "script": "routing.py",
        "project_only": True,
        "metrics": {
            **{
                f"n{n}_{key}": f"{n} instances: {label}"
                for n in (2, 4, 8)
                for key, label in (
                    ("busy_net_cpu_us_per_delivery", "busy CPU us/delivery (net)"),
                    ("uninvolved_net_cpu_us_per_message", "uninvolved CPU us/message (net)"),
                    ("uninvolved_received", "uninvolved messages received"),
                )
            },
            "busy_spread_pct": "busy CPU/delivery spread % (2-8)",
        },
    },
}
# Counts: a ratio means nothing for them.
COUNTS = {"lost", "duplicates", "out_of_order", "missing_events", "duplicate_events"} | {
    f"n{n}_uninvolved_received" for n in (2, 4, 8)
}
DEFAULT_ONLY = ["fanout-saturated", "fanout-steady", "inbound", "publish-api"]


def script_args(name: str, args: argparse.Namespace, target: str) -> list[str]:
    common_args = ["--runs", str(args.runs)]
    if not WORKLOADS[name].get("project_only"):
        common_args = ["--target", target, *common_args]
    if args.phase_timeout:
        common_args += ["--phase-timeout", str(args.phase_timeout)]
    if name == "fanout-saturated":
        extra = ["--mode", "saturated", "--sockets", str(args.sockets), "--messages", str(args.messages)]
    elif name == "fanout-steady":
        extra = ["--mode", "steady", "--sockets", str(args.sockets), "--rate", str(args.rate)]
        extra += ["--duration", str(args.duration)]
    elif name == "inbound":
        extra = ["--sockets", str(args.inbound_sockets), "--frames", str(args.frames)]
    elif name == "publish-api":
        extra = ["--requests", str(args.requests)]
    elif name == "publish-sockets" or (name == "publish-batch" and target == "baseline"):
        extra = ["--requests", str(args.requests), "--sockets", "10"]
    elif name == "publish-batch":
        extra = ["--requests", str(max(1, args.requests // 10)), "--batch", "100", "--sockets", "100"]
    elif name in ("presence", "routing"):
        return common_args  # their own PostgreSQL databases and sizes (10,000 members; 2, 4, 8 instances)
    else:
        extra = ["--idle", str(args.idle)]
    if target == "project":
        if name == "inbound" and args.inbound_database_url:
            extra += ["--database-url", args.inbound_database_url]
        elif name != "inbound" and args.database_url:
            extra += ["--database-url", args.database_url]
    return common_args + extra


def run_script(name: str, args: argparse.Namespace, target: str, stamp: str) -> dict[str, Any] | None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stamp}-{name}-{target}.json"
    argv = [
        PYTHON,
        str(BENCH / WORKLOADS[name]["script"]),
        *script_args(name, args, target),
        "--json-out",
        str(out),
    ]
    log(f"{name} / {target}: {' '.join(argv[1:])}")
    started = time.monotonic()
    try:
        result = subprocess.run(argv, cwd=ROOT, timeout=SCRIPT_TIMEOUT, stdout=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        log(f"{name} / {target}: stopped after {SCRIPT_TIMEOUT}s")
        return None
    log(f"{name} / {target}: exit {result.returncode} after {time.monotonic() - started:.0f}s")
    if not out.exists():
        print(result.stdout[-3000:])
        return None
    return json.loads(out.read_text())


def cell(summary: dict[str, Any], key: str, runs: int) -> str:
    s = summary.get(key)
    if s is None:
        return "-"
    text = _num(s["median"])
    if runs > 1:
        text += f" ({_num(s['min'])}–{_num(s['max'])})"
    return text


def _num(value: float) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def ratio(project: dict[str, Any], baseline: dict[str, Any], key: str) -> str:
    if key in COUNTS:
        return ""
    p, b = project.get(key), baseline.get(key)
    if not p or not b or not b["median"]:
        return "-"
    return f"{p['median'] / b['median']:.2f}"


def table(results: dict[str, dict[str, Any]], runs: int) -> str:
    lines = [
        "| workload | metric | project | baseline | ratio project/baseline |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, per_target in results.items():
        project = (per_target.get("project") or {}).get("summary", {})
        baseline = (per_target.get("baseline") or {}).get("summary", {})
        for key, label in WORKLOADS[name]["metrics"].items():
            if key not in project and key not in baseline:
                continue
            lines.append(
                f"| {name} | {label} | {cell(project, key, runs)} | {cell(baseline, key, runs)} "
                f"| {ratio(project, baseline, key)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=DEFAULT_ONLY)
    parser.add_argument(
        "--targets", nargs="+", choices=["project", "baseline"], default=["project", "baseline"]
    )
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--inbound-sockets", type=int, default=200)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--database-url", help="PostgreSQL for fanout/publish-api (default SQLite)")
    parser.add_argument("--inbound-database-url", help="for inbound (default PostgreSQL if reachable)")
    parser.add_argument(
        "--phase-timeout", type=float, help="passed to every script (default: each script's own)"
    )
    parser.add_argument("--markdown", help="also write the table (and conditions) to this file")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    before = common.machine()
    results: dict[str, dict[str, Any]] = {}
    for name in args.only:
        results[name] = {}
        for target in args.targets:
            if target == "baseline" and WORKLOADS[name].get("project_only"):
                continue
            results[name][target] = run_script(name, args, target, stamp)
    after = common.machine()

    violations = [
        f"{name}/{target}: {v}"
        for name, per_target in results.items()
        for target, data in per_target.items()
        if data
        for v in data["violations"]
    ]
    text = table(results, args.runs)
    conditions = (
        f"{before['nproc']} cores ({before['cpu']}), {before['ram_gib']} GiB RAM, Python {before['python']}; "
        f"load average {before['load_avg']} before, {after['load_avg']} after; runs per figure: {args.runs}"
    )
    print(f"\n{text}\n\n{conditions}")
    if violations:
        bar = "!" * 78
        print(f"\n{bar}\n!!! " + "\n!!! ".join(violations) + f"\n{bar}")
    if args.markdown:
        body = f"{text}\n\n{conditions}\n"
        if violations:
            body += "\nViolations:\n\n" + "\n".join(f"- {v}" for v in violations) + "\n"
        Path(args.markdown).write_text(body)
    (RESULTS / f"{stamp}-compare.json").write_text(
        json.dumps({"args": vars(args), "machine": [before, after], "results": results}, indent=2)
    )
    return common.EXIT_VIOLATION if violations else 0


if __name__ == "__main__":
    sys.exit(main())
