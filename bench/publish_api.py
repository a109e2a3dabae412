"""Publish API benchmark: POST /api/v1/messages/ alone (no sockets), on one web instance.

    .venv/bin/python bench/publish_api.py --requests 2000 --concurrency 8
    .venv/bin/python bench/publish_api.py --target baseline   (one group_send per request)

Every request must answer 202; requests/s is counted from the first request to the last answer.
"""

import argparse
import asyncio
import collections
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.common import Report, log, ms, percentile
from bench.deploy import Deployment, warm_up
from bench.fanout import publish

LABELS = {
    "requests": "requests",
    "accepted": "accepted (202)",
    "failed": "NOT accepted",
    "requests_per_s": "requests/s",
    "latency_p50_ms": "latency p50 ms",
    "latency_p99_ms": "latency p99 ms",
    "latency_max_ms": "latency max ms",
    "server_cpu_ms_per_request": "server CPU ms per request",
}


def run_publish(args: argparse.Namespace, db_url: str | None, users: dict[str, Any]) -> dict[str, Any]:
    deployment = Deployment(args.target, db_url, 1, {})
    notes: list[str] = []
    try:
        deployment.start()
        asyncio.run(warm_up(deployment, users, publish=True))
        shim = argparse.Namespace(
            messages=args.requests,
            publishers=args.concurrency,
            payload_bytes=args.payload_bytes,
            phase_timeout=args.phase_timeout,
        )
        cpu_before = common.cpu_of(deployment.webs)
        records = asyncio.run(publish(deployment.webs[0].url, users["publisher"], shim, "saturated"))
        server_cpu = common.cpu_of(deployment.webs) - cpu_before
        accepted = [r for r in records if r["status"] == 202]
        latencies = sorted(r["acked"] - r["sent"] for r in accepted)
        first = min((r["sent"] for r in records), default=0.0)
        last = max((r["acked"] for r in records), default=0.0)
        statuses = collections.Counter(str(r["status"]) for r in records)
        if len(statuses) > 1 or "202" not in statuses:
            notes.append(f"answers: {dict(statuses)}")
        metrics = {
            "requests": len(records),
            "accepted": len(accepted),
            "failed": len(records) - len(accepted),
            "requests_per_s": round(len(records) / (last - first), 1) if last > first else None,
            "latency_p50_ms": ms(percentile(latencies, 50)),
            "latency_p99_ms": ms(percentile(latencies, 99)),
            "latency_max_ms": ms(latencies[-1] if latencies else None),
            "server_cpu_ms_per_request": round(server_cpu / len(records) * 1000, 2) if records else None,
        }
        return {"metrics": metrics, "notes": notes}
    finally:
        deployment.close(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["project", "baseline"], default="project")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--payload-bytes", type=int, default=0)
    parser.add_argument(
        "--database-url", help="postgres://.../rt_bench (created and dropped); default SQLite"
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="seconds the requests may take")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    db = (
        common.BenchDatabase.create(args.database_url, args.keep_database)
        if args.target == "project"
        else None
    )
    params = {
        "target": args.target,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "database": db.kind if db else "none (redis)",
    }
    report = Report("publish_api", params)
    try:
        users = common.prepare_project_database(db, 1) if db else common.baseline_users(1)
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            run = run_publish(args, db.url if db else None, users)
            if run["metrics"]["failed"]:
                report.violations.append(f"run {index + 1}: {run['metrics']['failed']} requests not accepted")
            report.runs.append(run)
    finally:
        if db is not None:
            db.drop()
    return common.emit(report, LABELS, args.json, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
