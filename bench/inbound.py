"""Inbound benchmark: S sockets on two web instances send `echo` frames; two workers answer.

    .venv/bin/python bench/inbound.py --sockets 200 --frames 50
    .venv/bin/python bench/inbound.py --target baseline ...   (channel_layer.send + runworker)

Every socket belongs to its own user (an echo goes to the sender's user). Each socket keeps at
most --window frames waiting for their echo (0: sends all F at once). The servers run with
RT_SOCKET_RATE raised (default 100000 frames/s) so the per-socket rate limit does not throttle
the benchmark. Measured: echoes/s from the first send to the last echo, round trip (send ->
echo) percentiles, lost and duplicated echoes (each receipt id must get exactly one echo),
which worker processed how many frames, and the CPU an echo costs: the web instances', the
workers', and the services' (PostgreSQL and the broker, every process of each: see
`common.service_cpu`). The machine is saturated in this benchmark, so echoes/s is about its
cores over the CPU per echo of all of them, and the split shows where a change saved or cost.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.common import PHASE_TIMEOUT, Report, log, ms, percentile
from bench.deploy import Deployment, split_sockets
from bench.sockets import ClientPool, sender_main

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/rt_bench_inbound"
LABELS = {
    "sockets": "sockets open",
    "frames_sent": "frames sent",
    "receipts": "receipts",
    "echoes": "echoes (distinct receipt ids)",
    "lost": "LOST (receipt without echo)",
    "duplicates": "DUPLICATES (extra echoes)",
    "errors": "error frames (rate_limited, unavailable...)",
    "missing_receipts": "frames without receipt or error",
    "frames_per_s": "echoes/s (first send -> last echo)",
    "rtt_p50_ms": "round trip p50 ms (send -> echo)",
    "rtt_p99_ms": "round trip p99 ms",
    "rtt_max_ms": "round trip max ms",
    "receipt_p50_ms": "send -> receipt p50 ms",
    "receipt_p99_ms": "send -> receipt p99 ms",
    "cpu_ms_per_echo": "CPU ms per echo (webs + workers)",
    "web_cpu_ms_per_echo": "  of which web instances",
    "worker_cpu_ms_per_echo": "  of which workers",
    "services_cpu_ms_per_echo": "CPU ms per echo of the services",
    "pg_cpu_ms_per_echo": "  of which PostgreSQL",
    "broker_cpu_ms_per_echo": "  of which the broker (RabbitMQ or Redis)",
    "total_cpu_ms_per_echo": "CPU ms per echo, all the above",
    "worker_1_share_pct": "worker-1 share %",
    "worker_2_share_pct": "worker-2 share %",
}


def frame_records(env: dict[str, str], ids: list[str]) -> dict[str, Any]:
    """Which worker processed the frames, and their statuses, from the database (bench/tasks.py)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        json.dump(ids, out)
    try:
        output = common.run_python(env, "-m", "bench.tasks", "frames", out.name)
        return json.loads(output.strip().splitlines()[-1])
    finally:
        os.unlink(out.name)


def run_inbound(args: argparse.Namespace, db_url: str | None, users: dict[str, Any]) -> dict[str, Any]:
    extra = {"RT_SOCKET_RATE": str(args.socket_rate)}
    deployment = Deployment(args.target, db_url, 2, extra)
    pool: ClientPool | None = None
    notes: list[str] = []
    try:
        deployment.start()
        deployment.add_workers(args.workers, args.worker_concurrency)
        shares = split_sockets(
            args.sockets, [w.port for w in deployment.webs], users["listeners"], args.client_procs
        )
        pool = ClientPool(
            sender_main, [{"sockets": share, "open_deadline": args.phase_timeout} for share in shares]
        )
        ready = pool.collect("ready", args.phase_timeout + 30)
        opened = sum(r["opened"] for r in ready)
        failed = sum(r["failed"] for r in ready)
        if failed:
            notes.append(f"{failed} sockets failed to open: {[e for r in ready for e in r['errors']][:3]}")
        log(f"{opened} sockets open; each sends {args.frames} echo frames (window {args.window})")
        web_before = common.cpu_of(deployment.webs)
        worker_before = common.cpu_of(deployment.workers)
        services_before = common.service_cpu()
        pool.send(
            "go",
            {
                "frames": args.frames,
                "window": args.window,
                "deadline": args.phase_timeout,
                "quiet": args.quiet,
            },
        )
        results = pool.collect("result", args.phase_timeout + 60)
        web_cpu = common.cpu_of(deployment.webs) - web_before
        worker_cpu = common.cpu_of(deployment.workers) - worker_before
        services = common.service_cpu_since(services_before)
        pg_cpu, broker_cpu = services["postgresql"], services["rabbitmq"] + services["redis"]
        metrics, receipt_ids, workers = analyse(results)
        if metrics["echoes"]:
            per_echo = 1000 / metrics["echoes"]
            metrics["cpu_ms_per_echo"] = round((web_cpu + worker_cpu) * per_echo, 2)
            metrics["web_cpu_ms_per_echo"] = round(web_cpu * per_echo, 2)
            metrics["worker_cpu_ms_per_echo"] = round(worker_cpu * per_echo, 2)
            metrics["services_cpu_ms_per_echo"] = round((pg_cpu + broker_cpu) * per_echo, 2)
            metrics["pg_cpu_ms_per_echo"] = round(pg_cpu * per_echo, 2)
            metrics["broker_cpu_ms_per_echo"] = round(broker_cpu * per_echo, 2)
            metrics["total_cpu_ms_per_echo"] = round(
                (web_cpu + worker_cpu + pg_cpu + broker_cpu) * per_echo, 2
            )
        notes.append(
            f"CPU s during the run: webs {web_cpu:.1f}, workers {worker_cpu:.1f}, "
            f"PostgreSQL {pg_cpu:.1f}, broker {broker_cpu:.1f}"
        )
        metrics["sockets"] = opened
        if args.target == "project":
            records = frame_records(deployment.env, receipt_ids)
            workers = records["by_worker"]
            notes.append(f"inbound frame statuses in the database: {records['by_status']}")
        total = sum(workers.values()) or 1
        for i in range(args.workers):
            metrics[f"worker_{i + 1}_share_pct"] = round(100 * workers.get(f"worker-{i + 1}", 0) / total, 1)
        notes.append(f"frames per worker: {workers}")
        if any(r["timed_out"] for r in results):
            notes.append("the clients stopped waiting (deadline or quiet period) before every echo arrived")
        timed_out = any(r["timed_out"] for r in results)
        return {"metrics": metrics, "notes": notes, "workers": workers, "timed_out": timed_out}
    finally:
        if pool is not None:
            pool.stop()
        deployment.close(notes)


def analyse(results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    sockets = [s for r in results for s in r["sockets"]]
    sent_times: list[float] = []
    receipt_ids: list[str] = []
    echo_counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    workers: collections.Counter[str] = collections.Counter()
    rtts: list[float] = []
    receipt_rtts: list[float] = []
    last_echo = 0.0
    frames_sent = missing = 0
    for sock in sockets:
        sent_times.extend(sock["sent"].values())
        frames_sent += len(sock["sent"])
        receipt_ids.extend(sock["receipts"].values())
        for ref, arrived in sock.get("receipt_times", {}).items():
            sent = sock["sent"].get(int(ref.rsplit("-", 1)[1]))
            if sent is not None:
                receipt_rtts.append(arrived - sent)
        errors.update(sock["errors"])
        missing += max(0, len(sock["sent"]) - len(sock["receipts"]) - sum(sock["errors"].values()))
        for inbound_id, _i, sent, arrived, worker in sock["echoes"]:
            echo_counts[inbound_id] += 1
            if echo_counts[inbound_id] == 1:
                rtts.append(arrived - sent)
                last_echo = max(last_echo, arrived)
                if worker:
                    workers[worker] += 1
    receipts = set(receipt_ids)
    lost = sum(1 for i in receipts if echo_counts[i] == 0)
    duplicates = sum(n - 1 for n in echo_counts.values() if n > 1)
    stray = sum(1 for i in echo_counts if i not in receipts)
    distinct = sum(1 for i in receipts if echo_counts[i] > 0)
    rtts.sort()
    receipt_rtts.sort()
    first_send = min(sent_times, default=0.0)
    span = last_echo - first_send
    metrics = {
        "frames_sent": frames_sent,
        "receipts": len(receipts),
        "echoes": distinct,
        "lost": lost,
        "duplicates": duplicates,
        "stray_echoes": stray,
        "errors": sum(errors.values()),
        "missing_receipts": missing,
        "frames_per_s": round(distinct / span, 1) if span > 0 and distinct else None,
        "rtt_p50_ms": ms(percentile(rtts, 50)),
        "rtt_p99_ms": ms(percentile(rtts, 99)),
        "rtt_max_ms": ms(rtts[-1] if rtts else None),
        "receipt_p50_ms": ms(percentile(receipt_rtts, 50)),
        "receipt_p99_ms": ms(percentile(receipt_rtts, 99)),
    }
    if errors:
        metrics["error_codes"] = dict(errors)
    return metrics, sorted(receipts), dict(workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["project", "baseline"], default="project")
    parser.add_argument("--sockets", type=int, default=200, help="sockets (one user each) over 2 instances")
    parser.add_argument("--frames", type=int, default=50, help="echo frames each socket sends")
    parser.add_argument("--window", type=int, default=8, help="frames in flight per socket (0: all at once)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=4, help="run_workers --concurrency")
    parser.add_argument(
        "--socket-rate", type=float, default=100000, help="RT_SOCKET_RATE given to the servers"
    )
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument(
        "--database-url",
        help=f"default {DEFAULT_DATABASE} when PostgreSQL answers, else SQLite (which serialises writers)",
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=2.5 * PHASE_TIMEOUT,
        help="seconds the sending phase may take (10,000 round trips at ~80/s need ~2 minutes here)",
    )
    parser.add_argument(
        "--quiet", type=float, default=20.0, help="stop waiting after this many silent seconds"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.raise_fd_limit(max(4096, 2 * args.sockets + 1024))
    db = None
    if args.target == "project":
        url = args.database_url
        if url is None:
            url = DEFAULT_DATABASE if common.postgres_reachable(DEFAULT_DATABASE) else "sqlite"
            if url == "sqlite":
                log("PostgreSQL is not reachable: using SQLite, which serialises writers")
        db = common.BenchDatabase.create(url, args.keep_database)
    params: dict[str, Any] = {
        "target": args.target,
        "sockets": args.sockets,
        "frames": args.frames,
        "window": args.window,
        "workers": args.workers,
        "instances": 2,
        "client_procs": args.client_procs,
    }
    if db is not None:
        params |= {
            "worker_concurrency": args.worker_concurrency,
            "RT_SOCKET_RATE": args.socket_rate,
            "database": db.kind,
        }
    else:
        params["layer"] = "channels_redis (capacity 100000, expiry 60)"
    report = Report("inbound", params)
    started = time.monotonic()
    try:
        users = (
            common.prepare_project_database(db, args.sockets) if db else common.baseline_users(args.sockets)
        )
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            run = run_inbound(args, db.url if db else None, users)
            m = run["metrics"]
            for key in ("lost", "duplicates", "errors", "missing_receipts", "stray_echoes"):
                if m.get(key):
                    report.violations.append(
                        f"run {index + 1}: {key.upper()} = {m[key]} (of {m['frames_sent']} sent)"
                    )
            if m["sockets"] < args.sockets:
                report.violations.append(
                    f"run {index + 1}: only {m['sockets']} of {args.sockets} sockets opened"
                )
            report.runs.append(run)
    finally:
        if db is not None:
            db.drop()
    log(f"done in {time.monotonic() - started:.0f}s")
    return common.emit(report, LABELS, args.json, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
