"""Fan-out benchmark: S sockets on two web instances, one topic, M messages through one API.

    .venv/bin/python bench/fanout.py --mode saturated --sockets 1000 --messages 200
    .venv/bin/python bench/fanout.py --mode steady --rate 2 --duration 30
    .venv/bin/python bench/fanout.py --idle 5000
    .venv/bin/python bench/fanout.py --target baseline ...   (plain Channels + channels_redis)

Each message's payload carries `seq` and `sent_at` (time.time() just before its POST); the
sockets (in separate client processes) time every arrival, and this process counts delivered,
lost, duplicated and out-of-order messages, latency percentiles and the servers' memory.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench import common
from bench.common import PHASE_TIMEOUT, Report, log, ms, percentile
from bench.deploy import Deployment, rss, split_sockets, warm_up
from bench.sockets import ClientPool, listener_main

TOPIC = "bench"
LABELS = {
    "sockets": "sockets open",
    "messages_accepted": "messages accepted (202)",
    "expected": "deliveries expected",
    "delivered": "deliveries (distinct)",
    "lost": "LOST",
    "duplicates": "DUPLICATES",
    "out_of_order": "out of order (vs. 202 order)",
    "seq_inversions": "seq inversions (concurrent POSTs, info)",
    "deliveries_per_s": "deliveries/s (first POST -> last arrival)",
    "latency_p50_ms": "latency p50 ms (POST -> arrival)",
    "latency_p99_ms": "latency p99 ms",
    "latency_max_ms": "latency max ms",
    "publish_per_s": "publish requests/s",
    "publish_p50_ms": "publish POST p50 ms",
    "publish_p99_ms": "publish POST p99 ms",
    "server_cpu_s": "CPU s of both servers, publish phase",
    "cpu_us_per_delivery": "server CPU us per delivery",
    "rss_per_conn_kib": "server RSS per connection KiB",
    "rss_growth_after_publish_kib": "server RSS growth during publish KiB (sum)",
    "open_seconds": "seconds to open+subscribe all sockets",
    "idle_sockets": "idle sockets open",
    "rss_per_idle_socket_kib": "server RSS per idle socket KiB",
    "rss_before_kib": "server RSS before KiB",
    "rss_after_kib": "server RSS after KiB",
    "fds_after": "server open fds after",
}


# --- publishing ---------------------------------------------------------------------------


async def publish(url: str, token: str | None, args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Token {token}"} if token else {}
    pad = "x" * args.payload_bytes
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=args.publishers, max_keepalive_connections=args.publishers)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def post(seq: int) -> None:
            sent = time.time()
            payload: dict[str, Any] = {"seq": seq, "sent_at": sent}
            if pad:
                payload["pad"] = pad
            try:
                response = await http.post(
                    "/api/v1/messages/",
                    json={"topic": TOPIC, "event": "bench", "payload": payload},
                    headers=headers,
                )
                status: int | str = response.status_code
                body = (
                    response.json()
                    if response.headers.get("content-type", "").startswith("application/json")
                    else {}
                )
            except httpx.HTTPError as exc:
                status, body = type(exc).__name__, {}
            records.append(
                {
                    "seq": seq,
                    "sent": sent,
                    "acked": time.time(),
                    "status": status,
                    "state": body.get("status"),
                }
            )

        try:
            async with asyncio.timeout(args.phase_timeout):
                if mode == "saturated":
                    sequence = iter(range(args.messages))

                    async def publisher() -> None:
                        for seq in sequence:
                            await post(seq)

                    await asyncio.gather(*(publisher() for _ in range(args.publishers)))
                else:
                    start = time.monotonic()
                    for seq in range(int(args.rate * args.duration)):
                        delay = start + seq / args.rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)  # paces the load: `--rate` messages/s
                        await post(seq)
        except TimeoutError:
            log(
                f"publishing stopped by the {args.phase_timeout:.0f}s phase limit after {len(records)} messages"
            )
    return records


# --- one run ------------------------------------------------------------------------------


def start_listeners(
    args: argparse.Namespace, sockets: int, webs: list[Any], users: dict[str, Any], topic: str | None
) -> ClientPool:
    """Client processes that open `sockets` sockets over `webs` (subscribed to `topic`, if any)."""
    shares = split_sockets(sockets, [w.port for w in webs], users["listeners"], args.client_procs)
    return ClientPool(
        listener_main,
        [{"sockets": share, "topic": topic, "open_deadline": args.phase_timeout} for share in shares],
    )


def await_listeners(
    pool: ClientPool, args: argparse.Namespace, notes: list[str]
) -> tuple[list[dict[str, Any]], float, int, int]:
    """Wait until every client process has opened its sockets: (reports, seconds, opened, failed)."""
    started = time.monotonic()
    ready = pool.collect("ready", args.phase_timeout + 30)
    open_seconds = time.monotonic() - started
    opened = sum(r["opened"] for r in ready)
    failed = sum(r["failed"] for r in ready)
    if failed:
        notes.append(f"{failed} sockets failed to open: {[e for r in ready for e in r['errors']][:3]}")
    return ready, open_seconds, opened, failed


def run_fanout(
    args: argparse.Namespace, db_url: str | None, users: dict[str, Any], mode: str
) -> dict[str, Any]:
    extra = {} if args.delivery_log else {"RT_DELIVERY_LOG": "0"}
    deployment = Deployment(args.target, db_url, 2, extra)
    pool: ClientPool | None = None
    notes: list[str] = []
    try:
        deployment.start()
        asyncio.run(warm_up(deployment, users, publish=True))
        before = rss(deployment.webs)
        pool = start_listeners(args, args.sockets, deployment.webs, users, TOPIC)
        ready, open_seconds, opened, failed = await_listeners(pool, args, notes)
        per_instance: dict[str, int] = {}
        for r in ready:
            for name, n in r["instances"].items():
                per_instance[name] = per_instance.get(name, 0) + n
        # Deliberate, not a wait for an event: RSS is read 1 s after the last socket is open and
        # subscribed, as for every published figure, so runs stay comparable.
        time.sleep(1.0)
        after = rss(deployment.webs)
        log(f"{opened} sockets open ({per_instance}) in {open_seconds:.1f}s; publishing ({mode})")

        cpu_before = common.cpu_of(deployment.webs)
        records = asyncio.run(publish(deployment.webs[0].url, users["publisher"], args, mode))
        accepted = [r for r in records if r["status"] == 202]
        pool.send(
            "expect", {"per_socket": len(accepted), "deadline": args.phase_timeout, "quiet": args.quiet}
        )
        results = pool.collect("result", args.phase_timeout + 30)
        after_publish = rss(deployment.webs)
        server_cpu = common.cpu_of(deployment.webs) - cpu_before

        metrics = analyse(records, results)
        metrics["sockets"] = opened
        metrics["server_cpu_s"] = round(server_cpu, 2)
        if metrics["delivered"]:
            metrics["cpu_us_per_delivery"] = round(server_cpu / metrics["delivered"] * 1e6, 1)
        metrics["open_seconds"] = round(open_seconds, 2)
        growth = []
        for web in deployment.webs:
            n = per_instance.get(web.name, 0)
            if n:
                growth.append((after[web.name] - before[web.name]) / n)
        metrics["rss_per_conn_kib"] = round(sum(growth) / len(growth), 2) if growth else None
        metrics["rss_growth_after_publish_kib"] = sum(after_publish[k] - after[k] for k in after)
        memory = {"before_kib": before, "after_open_kib": after, "after_publish_kib": after_publish}
        threads = {w.name: common.proc_status(w.pid, "Threads") for w in deployment.webs}
        fds = {w.name: common.open_fds(w.pid) for w in deployment.webs}
        notes.append(f"RSS KiB {memory}; sockets per instance {per_instance}; threads {threads}; fds {fds}")
        others = {k: v for r in results for k, v in r["others"].items()}
        if others:
            notes.append(f"other frames received: {others}")
        if any(r["timed_out"] for r in results):
            notes.append(
                "the clients stopped waiting (deadline or quiet period) before every delivery arrived"
            )
        bad = [r for r in records if r["status"] != 202]
        if bad:
            notes.append(f"{len(bad)} publishes not accepted, e.g. {bad[:3]}")
        if any(r["state"] not in (None, "published") for r in accepted):
            notes.append("some 202 answers had a status other than 'published'")
        closed = sum(1 for r in results for s in r["sockets"] if s["closed_code"] is not None)
        if closed:
            notes.append(f"{closed} sockets were closed by the server during the run")
        return {
            "metrics": metrics,
            "notes": notes,
            "memory": memory,
            "publish_failures": len(bad),
            "closed": closed,
        }
    finally:
        if pool is not None:
            pool.stop()
        deployment.close(notes)


def analyse(records: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    accepted = {r["seq"]: r for r in records if r["status"] == 202}
    sockets = [s for r in results for s in r["sockets"]]
    delivered = duplicates = lost = out_of_order = inversions = unexpected = 0
    latencies: list[float] = []
    by_instance: dict[str, list[float]] = {}
    by_message: dict[int, list[float]] = {}
    last_arrival = 0.0
    for sock in sockets:
        seen: set[int] = set()
        newest_sent = 0.0
        highest_seq = -1
        for seq, arrived in sock["arrivals"]:
            record = accepted.get(seq)
            if record is None:
                unexpected += 1
                continue
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            delivered += 1
            latencies.append(arrived - record["sent"])
            by_instance.setdefault(sock["instance"], []).append(arrived - record["sent"])
            by_message.setdefault(seq, []).append(arrived - record["sent"])
            last_arrival = max(last_arrival, arrived)
            # Out of order: an earlier arrival was POSTed after this message's 202 came back.
            if newest_sent > record["acked"]:
                out_of_order += 1
            newest_sent = max(newest_sent, record["sent"])
            if seq < highest_seq:
                inversions += 1
            highest_seq = max(highest_seq, seq)
        lost += len(accepted) - len(seen)
    latencies.sort()
    for name, values in sorted(by_instance.items()):
        values.sort()
        log(f"latency p50/p99 ms on {name}: {ms(percentile(values, 50))} / {ms(percentile(values, 99))}")
    slowest = sorted((max(v), seq, ms(percentile(sorted(v), 50))) for seq, v in by_message.items())[-5:]
    log("slowest messages (max ms, seq, p50 ms): " + ", ".join(f"{ms(m)} #{q} {p}" for m, q, p in slowest))
    posts = sorted(r["acked"] - r["sent"] for r in records if r["status"] == 202)
    first_post = min((r["sent"] for r in records), default=0.0)
    last_ack = max((r["acked"] for r in records), default=0.0)
    span = last_arrival - first_post if delivered else 0.0
    return {
        "messages_accepted": len(accepted),
        "expected": len(accepted) * len(sockets),
        "delivered": delivered,
        "lost": lost,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "out_of_order": out_of_order,
        "seq_inversions": inversions,
        "deliveries_per_s": round(delivered / span, 1) if span > 0 else None,
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "latency_max_ms": ms(latencies[-1] if latencies else None),
        "publish_per_s": round(len(records) / (last_ack - first_post), 1) if last_ack > first_post else None,
        "publish_p50_ms": ms(percentile(posts, 50)),
        "publish_p99_ms": ms(percentile(posts, 99)),
    }


def run_idle(args: argparse.Namespace, db_url: str | None, users: dict[str, Any]) -> dict[str, Any]:
    deployment = Deployment(args.target, db_url, 1, {})
    pool: ClientPool | None = None
    notes: list[str] = []
    try:
        deployment.start()
        asyncio.run(warm_up(deployment, users, publish=False))
        web = deployment.webs[0]
        before = common.rss_kib(web.pid) or 0
        pool = start_listeners(args, args.idle, [web], users, None)
        _, open_seconds, opened, failed = await_listeners(pool, args, notes)
        time.sleep(2.0)  # deliberate, as above: RSS 2 s after the last handshake
        after = common.rss_kib(web.pid) or 0
        metrics = {
            "idle_sockets": opened,
            "open_seconds": round(open_seconds, 2),
            "rss_before_kib": before,
            "rss_after_kib": after,
            "rss_per_idle_socket_kib": round((after - before) / opened, 2) if opened else None,
            "fds_after": common.open_fds(web.pid),
        }
        return {"metrics": metrics, "notes": notes, "failed": failed}
    finally:
        if pool is not None:
            pool.stop()
        deployment.close(notes)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["project", "baseline"], default="project")
    parser.add_argument("--mode", choices=["saturated", "steady"], default="saturated")
    parser.add_argument("--sockets", type=int, default=1000, help="sockets, spread evenly over 2 instances")
    parser.add_argument("--messages", type=int, default=200, help="messages in saturated mode")
    parser.add_argument("--publishers", type=int, default=8, help="concurrent publishers (saturated)")
    parser.add_argument("--rate", type=float, default=2.0, help="messages/s in steady mode")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady mode")
    parser.add_argument("--payload-bytes", type=int, default=0, help="padding added to each payload")
    parser.add_argument("--users", type=int, default=100, help="listener users the sockets belong to")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes holding the sockets")
    parser.add_argument(
        "--idle", type=int, nargs="?", const=5000, help="idle mode: N idle sockets on ONE instance"
    )
    parser.add_argument(
        "--database-url", help="postgres://.../rt_bench (created and dropped); default SQLite"
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument(
        "--no-delivery-log", dest="delivery_log", action="store_false", help="RT_DELIVERY_LOG=0"
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat, report median and min-max")
    parser.add_argument("--phase-timeout", type=float, default=PHASE_TIMEOUT)
    parser.add_argument(
        "--quiet", type=float, default=20.0, help="stop waiting after this many silent seconds"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--json-out", help="also write the JSON report to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sockets = args.idle if args.idle else args.sockets
    limit = common.raise_fd_limit(max(4096, 2 * sockets + 1024))
    if limit < sockets + 256:
        log(f"open-files limit {limit} is too low for {sockets} sockets")
    db = (
        common.BenchDatabase.create(args.database_url, args.keep_database)
        if args.target == "project"
        else None
    )
    params: dict[str, Any] = {"target": args.target}
    if args.idle:
        params |= {"mode": "idle", "sockets": args.idle, "instances": 1}
    else:
        params |= {"mode": args.mode, "sockets": args.sockets, "instances": 2}
        if args.mode == "saturated":
            params |= {"messages": args.messages, "publishers": args.publishers}
        else:
            params |= {"rate": args.rate, "duration": args.duration}
        if args.target == "project":
            params["delivery_log"] = args.delivery_log
    params |= {"client_procs": args.client_procs, "database": db.kind if db else "none (redis)"}
    report = Report("fanout", params)
    try:
        users = common.prepare_project_database(db, args.users) if db else common.baseline_users(args.users)
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            if args.idle:
                run = run_idle(args, db.url if db else None, users)
                if run["failed"]:
                    report.violations.append(f"run {index + 1}: {run['failed']} idle sockets failed to open")
            else:
                run = run_fanout(args, db.url if db else None, users, args.mode)
                m = run["metrics"]
                for key in ("lost", "duplicates", "out_of_order"):
                    if m.get(key):
                        report.violations.append(
                            f"run {index + 1}: {key.upper()} = {m[key]} (of {m['expected']})"
                        )
                if m["sockets"] < args.sockets:
                    report.violations.append(
                        f"run {index + 1}: only {m['sockets']} of {args.sockets} sockets opened"
                    )
                if run["publish_failures"]:
                    report.violations.append(
                        f"run {index + 1}: {run['publish_failures']} publishes not accepted"
                    )
            report.runs.append(run)
    finally:
        if db is not None:
            db.drop()
    return common.emit(report, LABELS, args.json, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
