"""Targeted routing benchmark (issue 14): per-instance CPU when every message is for ONE instance.

    .venv/bin/python bench/routing.py                                   # 2, 4, 8 instances; 3,000 messages at 60/s
    .venv/bin/python bench/routing.py --instances 2 4 --messages 300    # while developing

For each count N of `--instances`, a deployment of N web instances holding sockets (`web-1` ...
`web-N`) and one more, `api`, that holds none and takes the POSTs, so the cost of the publish
API (4 ms of CPU per request here) lands on no measured instance. `web-1` holds ONE socket,
subscribed to the busy topic; every other instance holds one socket subscribed to a topic of its
own that nothing is published to (so it has bindings on the route exchange, as an instance with
traffic of its own would). `--messages` messages for the busy topic are POSTed through `api` at
`--rate` messages/s, the same for every N (the CPU per delivery depends on the rate: messages
that arrive together share a wake-up), by `--publishers` concurrent publishers, after `--warmup`
messages that are not counted.

Measured per N, from /proc/<pid>/stat, between the first POST and the last arrival:
- the busy instance's CPU per delivery (raw, and "net": minus its own idle CPU rate, measured
  over `--idle-seconds` just before, times the phase's length);
- each uninvolved instance's CPU per message published (raw and net; mean and max over them),
  which should stay near zero;
- each instance's `rt_messages_received_total` and `rt_deliveries_total` (its `/metrics`):
  an uninvolved instance must take nothing from the broker (CONTRACT §2), else a violation;
- the `api` instance's CPU per request and the PostgreSQL backends' CPU per message (for scale).
The issue's targets: uninvolved CPU near zero, and the busy instance's CPU per delivery within
10 % from 2 to 8 instances (`busy_spread_pct`, from the net figures; the raw spread too).
"""

import argparse
import asyncio
import collections
import re
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson

from bench import common
from bench.common import PHASE_TIMEOUT, Report, log, ms, percentile
from bench.deploy import Deployment
from bench.presence import pg_backend_cpu
from bench.sockets import (
    GRACE_SECONDS,
    OPEN_TIMEOUT,
    ClientPool,
    SocketSpec,
    Tickets,
    open_socket,
    recv_command,
    without_collector,
)

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/rt_bench_routing"
BUSY_TOPIC = "route-busy"
TARGET_SPREAD_PCT = 10.0
COUNTERS = ("rt_messages_received_total", "rt_deliveries_total")
PER_N = {
    "delivered": "busy socket: deliveries (distinct)",
    "lost": "LOST",
    "duplicates": "DUPLICATES",
    "publish_per_s": "publish requests/s (through api)",
    "latency_p50_ms": "latency p50 ms (POST -> arrival)",
    "phase_s": "phase seconds (first POST -> last arrival)",
    "busy_cpu_us_per_delivery": "busy instance CPU us/delivery",
    "busy_net_cpu_us_per_delivery": "  net of its idle rate",
    "busy_idle_cpu_ms_per_s": "  its idle CPU ms/s",
    "uninvolved_cpu_us_per_message": "uninvolved instance CPU us/message (mean)",
    "uninvolved_max_cpu_us_per_message": "  max over them",
    "uninvolved_net_cpu_us_per_message": "  net of their idle rate (mean)",
    "uninvolved_idle_cpu_ms_per_s": "  their idle CPU ms/s (mean)",
    "busy_received": "busy instance rt_messages_received",
    "uninvolved_received": "UNINVOLVED rt_messages_received (sum)",
    "uninvolved_deliveries": "uninvolved rt_deliveries (sum)",
    "api_cpu_ms_per_request": "api instance CPU ms/request",
    "pg_cpu_us_per_message": "PostgreSQL CPU us/message",
}


# --- the client process: one socket per (instance, topic) ---------------------------------


def holder_main(conn: Connection, cfg: dict[str, Any]) -> None:
    without_collector()
    try:
        asyncio.run(_holder(conn, cfg))
    except Exception as exc:
        conn.send(("failed", {"error": f"{type(exc).__name__}: {exc}"}))


async def _holder(conn: Connection, cfg: dict[str, Any]) -> None:
    """Open each socket, subscribed to its own topic; count what each receives."""
    async with httpx.AsyncClient(timeout=OPEN_TIMEOUT) as http:
        tickets = Tickets(http)
        sockets = []
        for s in cfg["sockets"]:
            topic = s.pop("topic")
            sockets.append((topic, await open_socket(SocketSpec(**s), tickets, topic)))
    arrivals: dict[str, list[tuple[str, int, float, float]]] = collections.defaultdict(list)
    others: collections.Counter[str] = collections.Counter()
    progress = {"last": time.monotonic()}
    for topic, sock in sockets:

        def on_frame(arrived: float, raw: str, topic: str = topic) -> None:
            frame = orjson.loads(raw)
            payload = frame.get("payload")
            if frame.get("type") == "message" and isinstance(payload, dict) and "seq" in payload:
                arrivals[topic].append((payload["phase"], payload["seq"], payload["sent_at"], arrived))
                progress["last"] = time.monotonic()
            else:
                others[f"{frame.get('type')}:{frame.get('code', '')}"] += 1

        sock.ws.deliver_to(on_frame)
    conn.send(("ready", {"instances": {topic: sock.instance for topic, sock in sockets}}))
    try:
        while True:
            command, arg = await recv_command(conn)
            if command == "close":
                break
            if command == "expect":
                phase, count = arg["phase"], arg["count"]

                def distinct(phase: str = phase) -> int:
                    return len({seq for p, seq, *_ in arrivals[BUSY_TOPIC] if p == phase})

                limit = time.monotonic() + arg["deadline"]
                while distinct() < count and time.monotonic() < limit:
                    if time.monotonic() - progress["last"] > arg["quiet"]:
                        break
                    await asyncio.sleep(0.05)
                timed_out = distinct() < count
                await asyncio.sleep(GRACE_SECONDS)  # deliberate: late duplicates arrive now
                conn.send(
                    (
                        "result",
                        {
                            "arrivals": {t: [a for a in v if a[0] == phase] for t, v in arrivals.items()},
                            "others": dict(others),
                            "timed_out": timed_out,
                        },
                    )
                )
    finally:
        for _, sock in sockets:
            try:
                await asyncio.wait_for(sock.ws.close(), 5)
            except Exception:
                pass


# --- publishing, and reading the instances -------------------------------------------------


async def publish(
    url: str, token: str, count: int, publishers: int, rate: float, phase: str, timeout: float
) -> list[dict]:
    """`count` POSTs to the busy topic by `publishers` concurrent publishers: message i is sent
    at i / `rate` s (or at once, if behind), so every N sees the same message rate; with `rate`
    0 each publisher posts as soon as its previous POST answered."""
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=publishers, max_keepalive_connections=publishers)
    headers = {"Authorization": f"Token {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=headers) as http:
        sequence = iter(range(count))
        start = time.monotonic()

        async def publisher() -> None:
            for seq in sequence:
                delay = start + seq / rate - time.monotonic() if rate else 0.0
                if delay > 0:
                    await asyncio.sleep(delay)  # paces the load: `rate` messages/s
                sent = time.time()
                body = {
                    "topic": BUSY_TOPIC,
                    "event": "route",
                    "payload": {"seq": seq, "sent_at": sent, "phase": phase},
                }
                try:
                    status: int | str = (await http.post("/api/v1/messages/", json=body)).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                records.append({"seq": seq, "sent": sent, "acked": time.time(), "status": status})

        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(publisher() for _ in range(publishers)))
        except TimeoutError:
            log(f"publishing stopped by the {timeout:.0f}s phase limit after {len(records)} messages")
    return records


def counters(webs: list[common.Proc]) -> dict[str, dict[str, float]]:
    """COUNTERS of each instance, from its own /metrics (summed over their label sets)."""
    out: dict[str, dict[str, float]] = {}
    for web in webs:
        text = httpx.get(f"{web.url}/metrics", timeout=10).text
        values = dict.fromkeys(COUNTERS, 0.0)
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if match and match.group(1) in values:
                values[match.group(1)] += float(match.group(3))
        out[web.name] = values
    return out


def cpu(webs: list[common.Proc]) -> dict[str, float]:
    return {w.name: common.cpu_seconds(w.pid) for w in webs}


# --- one deployment of N instances ---------------------------------------------------------


def run_count(args: argparse.Namespace, n: int, db_url: str, users: dict[str, Any]) -> dict[str, Any]:
    """N socket-holding instances plus `api`: the figures of this N, prefixed `n<N>_`."""
    deployment = Deployment("project", db_url, n + 1, {})
    deployment.instance_ids = ["api"] + [f"web-{i + 1}" for i in range(n)]
    pool: ClientPool | None = None
    notes: list[str] = []
    try:
        started = time.monotonic()
        deployment.start()
        log(f"{n} + 1 instances ready in {time.monotonic() - started:.1f}s")
        api, webs = deployment.webs[0], deployment.webs[1:]
        busy, uninvolved = webs[0], webs[1:]
        listeners = users["listeners"]
        sockets = [
            {
                "port": web.port,
                "user": listeners[i][0],
                "token": listeners[i][1],
                "topic": BUSY_TOPIC if i == 0 else f"route-quiet-{i + 1}",
            }
            for i, web in enumerate(webs)
        ]
        pool = ClientPool(holder_main, [{"sockets": sockets}])
        held = pool.collect("ready", args.phase_timeout)[0]["instances"]
        if held.get(BUSY_TOPIC) != busy.name:
            notes.append(f"the busy socket is on {held.get(BUSY_TOPIC)}, not {busy.name}: {held}")

        token = users["publisher"]
        if args.warmup:
            records = asyncio.run(
                publish(api.url, token, args.warmup, args.publishers, args.rate, "warm", args.phase_timeout)
            )
            pool.send("expect", {"phase": "warm", "count": args.warmup, "deadline": 30, "quiet": 10})
            pool.collect("result", 60)
        # Each instance's own background (lease renewals, lapsed-lease checks, keepalive pings).
        idle_before = cpu(webs)
        time.sleep(args.idle_seconds)  # deliberate: the idle window is a measurement
        idle_rate = {k: (v - idle_before[k]) / args.idle_seconds for k, v in cpu(webs).items()}

        before_counts = counters(deployment.webs)
        before_cpu = cpu(deployment.webs)
        before_pg = pg_backend_cpu(db_url)
        first_post = time.time()
        log(
            f"{n} instances: {args.messages} messages through api at {args.rate:g}/s, {args.publishers} publishers"
        )
        records = asyncio.run(
            publish(api.url, token, args.messages, args.publishers, args.rate, "measure", args.phase_timeout)
        )
        accepted = {r["seq"]: r for r in records if r["status"] == 202}
        pool.send(
            "expect",
            {"phase": "measure", "count": len(accepted), "deadline": args.phase_timeout, "quiet": 20},
        )
        result = pool.collect("result", args.phase_timeout + 30)[0]
        after_cpu = cpu(deployment.webs)
        after_pg = pg_backend_cpu(db_url)
        after_counts = counters(deployment.webs)

        busy_arrivals = result["arrivals"].get(BUSY_TOPIC, [])
        last_arrival = max((a[3] for a in busy_arrivals), default=time.time())
        # The CPU window ends after the clients' grace second: count that second in the phase too.
        phase_s = last_arrival - first_post + GRACE_SECONDS
        seqs = collections.Counter(a[1] for a in busy_arrivals)
        delivered = sum(1 for s in seqs if s in accepted)
        latencies = sorted(a[3] - accepted[a[1]]["sent"] for a in busy_arrivals if a[1] in accepted)
        used = {k: after_cpu[k] - before_cpu[k] for k in after_cpu}
        net = {w.name: used[w.name] - idle_rate[w.name] * phase_s for w in webs}
        received = {k: after_counts[k][COUNTERS[0]] - before_counts[k][COUNTERS[0]] for k in after_counts}
        deliveries = {k: after_counts[k][COUNTERS[1]] - before_counts[k][COUNTERS[1]] for k in after_counts}
        messages = max(len(accepted), 1)
        un_raw = [used[w.name] / messages * 1e6 for w in uninvolved]
        un_net = [net[w.name] / messages * 1e6 for w in uninvolved]
        pg = sum(v - before_pg.get(pid, 0.0) for pid, v in after_pg.items())
        last_ack = max((r["acked"] for r in records), default=first_post)
        metrics: dict[str, Any] = {
            "messages_accepted": len(accepted),
            "delivered": delivered,
            "lost": len(accepted) - delivered,
            "duplicates": sum(c - 1 for c in seqs.values()),
            "publish_per_s": round(len(records) / (last_ack - first_post), 1)
            if last_ack > first_post
            else None,
            "latency_p50_ms": ms(percentile(latencies, 50)),
            "latency_p99_ms": ms(percentile(latencies, 99)),
            "phase_s": round(phase_s, 1),
            "busy_cpu_s": round(used[busy.name], 3),
            "busy_cpu_us_per_delivery": round(used[busy.name] / max(delivered, 1) * 1e6, 1),
            "busy_net_cpu_us_per_delivery": round(net[busy.name] / max(delivered, 1) * 1e6, 1),
            "busy_idle_cpu_ms_per_s": round(idle_rate[busy.name] * 1000, 2),
            "uninvolved_cpu_us_per_message": round(sum(un_raw) / len(un_raw), 2) if un_raw else None,
            "uninvolved_max_cpu_us_per_message": round(max(un_raw), 2) if un_raw else None,
            "uninvolved_net_cpu_us_per_message": round(sum(un_net) / len(un_net), 2) if un_net else None,
            "uninvolved_idle_cpu_ms_per_s": (
                round(sum(idle_rate[w.name] for w in uninvolved) / len(uninvolved) * 1000, 2)
                if uninvolved
                else None
            ),
            "busy_received": received[busy.name],
            "uninvolved_received": sum(received[w.name] for w in uninvolved),
            "uninvolved_deliveries": sum(deliveries[w.name] for w in uninvolved),
            "api_received": received[api.name],
            "api_cpu_ms_per_request": round(used[api.name] / max(len(records), 1) * 1000, 2),
            "pg_cpu_us_per_message": round(pg / messages * 1e6, 1),
        }
        per_instance = {
            name: {
                "cpu_s": round(used[name], 3),
                "net_cpu_s": round(net[name], 3) if name in net else None,
                "idle_cpu_ms_per_s": round(idle_rate[name] * 1000, 2) if name in idle_rate else None,
                "received": received[name],
                "deliveries": deliveries[name],
            }
            for name in used
        }
        log(f"{n} instances: per instance {per_instance}")
        statuses = collections.Counter(str(r["status"]) for r in records)
        if set(statuses) != {"202"}:
            notes.append(f"{n} instances: answers {dict(statuses)}")
        if result["others"]:
            notes.append(f"{n} instances: other frames at the sockets: {result['others']}")
        if result["timed_out"]:
            notes.append(f"{n} instances: the client stopped waiting before every delivery arrived")
        stray = {t: len(v) for t, v in result["arrivals"].items() if t != BUSY_TOPIC and v}
        if stray:
            notes.append(f"{n} instances: messages at sockets of other topics: {stray}")
        return {
            "metrics": {f"n{n}_{k}": v for k, v in metrics.items()},
            "per_instance": per_instance,
            "notes": notes,
        }
    finally:
        if pool is not None:
            pool.stop()
        deployment.close(notes)


def spread(values: list[float]) -> float | None:
    """(max - min) / min, in %."""
    values = [v for v in values if v]
    if len(values) < 2 or min(values) <= 0:
        return None
    return round((max(values) - min(values)) / min(values) * 100, 1)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--instances", type=int, nargs="+", default=[2, 4, 8], help="socket-holding instances"
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages for the busy topic, per count")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishers")
    parser.add_argument(
        "--rate",
        type=float,
        default=60.0,
        help="messages/s, the same for every N (0: as fast as the API goes)",
    )
    parser.add_argument("--warmup", type=int, default=50, help="messages before the measured ones")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="idle window before publishing")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE, help="PostgreSQL (created and dropped)")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--phase-timeout", type=float, default=2.5 * PHASE_TIMEOUT)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out")
    return parser.parse_args(argv)


def labels(counts: list[int]) -> dict[str, str]:
    out = {}
    for n in counts:
        for key, label in PER_N.items():
            out[f"n{n}_{key}"] = f"{n} inst: {label}"
    out["busy_spread_pct"] = "busy CPU/delivery spread % (net; target <= 10)"
    out["busy_raw_spread_pct"] = "busy CPU/delivery spread % (raw)"
    out["uninvolved_received"] = "UNINVOLVED rt_messages_received (all counts)"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.database_url.startswith("postgres"):
        raise SystemExit(
            "routing is measured on PostgreSQL (its backends' CPU is read): pass a postgres:// URL"
        )
    db = common.BenchDatabase.create(args.database_url, args.keep_database)
    params = {
        "instances": args.instances,
        "messages": args.messages,
        "publishers": args.publishers,
        "rate": args.rate,
        "busy_sockets": 1,
        "database": db.kind,
    }
    report = Report("routing", params)
    started = time.monotonic()
    try:
        users = common.prepare_project_database(db, max(args.instances))
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            run: dict[str, Any] = {"metrics": {}, "per_instance": {}, "notes": []}
            for n in args.instances:
                part = run_count(args, n, db.url, users)
                run["metrics"] |= part["metrics"]
                run["per_instance"][n] = part["per_instance"]
                run["notes"] += part["notes"]
                m = part["metrics"]
                for key in ("lost", "duplicates", "uninvolved_received"):
                    if m.get(f"n{n}_{key}"):
                        report.violations.append(
                            f"run {index + 1}, {n} instances: {key.upper()} = {m[f'n{n}_{key}']}"
                        )
            m = run["metrics"]
            m["busy_spread_pct"] = spread(
                [m.get(f"n{n}_busy_net_cpu_us_per_delivery") for n in args.instances]
            )
            m["busy_raw_spread_pct"] = spread(
                [m.get(f"n{n}_busy_cpu_us_per_delivery") for n in args.instances]
            )
            m["uninvolved_received"] = sum(m.get(f"n{n}_uninvolved_received") or 0 for n in args.instances)
            verdict = (
                "met"
                if m["busy_spread_pct"] is not None and m["busy_spread_pct"] <= TARGET_SPREAD_PCT
                else "NOT met"
            )
            run["notes"].append(
                f"target: busy CPU per delivery within {TARGET_SPREAD_PCT:.0f} % over {args.instances} "
                f"instances: {verdict} (net spread {m['busy_spread_pct']} %, raw {m['busy_raw_spread_pct']} %)"
            )
            report.runs.append(run)
    finally:
        db.drop()
    log(f"done in {time.monotonic() - started:.0f}s")
    return common.emit(report, labels(args.instances), args.json, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
