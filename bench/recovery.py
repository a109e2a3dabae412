"""Reconnect storm: S sockets of a killed instance recover a topic's missed messages on another.

    .venv/bin/python bench/recovery.py                              # 1,000 sockets, 10 then 100 messages
    .venv/bin/python bench/recovery.py --sockets 100 --missed 20    # while developing

Two web instances, A and B. `--sockets` sockets on A (in `--client-procs` client processes), all
subscribed to one topic, read its first `--first` messages; A is SIGKILLed; `--missed` messages
are published through B; then every socket reconnects to B at once (`--connect-concurrency`
handshakes in flight per client process) and sends `subscribe` with `since` (the last seq and
epoch it saw), CONTRACT §4 "Streams and recovery". Measured: the time from the reconnect command
until every socket has received all the missed messages (the target is 10 s for 1,000 sockets),
per-socket times, and whether each socket got the answer first, `recovered: true`, every missed
seq once and in order. The database work of the storm is read from PostgreSQL's statistics
(pg_stat_statements needs a server restart to load, so it is not used): index scans and rows
read on the message table's (stream, seq) index (one scan per history read), transactions and
rows fetched of the benchmark's database, per-table scans, and the deltas of B's own `/metrics`
counters of streams (`rt_stream_reads_total`: database reads of stream positions and history).
"""

import argparse
import asyncio
import collections
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson

from bench import common, wsclient
from bench.common import PHASE_TIMEOUT, Report, log, ms, percentile
from bench.deploy import Deployment, split_sockets, warm_up
from bench.sockets import (
    GRACE_SECONDS,
    OPEN_TIMEOUT,
    ClientPool,
    SocketSpec,
    open_all,
    recv_command,
    without_collector,
)

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/rt_bench_recovery"
# Each run has a topic of its own (`bench-recovery-<n>`), numbered from 1.
TOPIC = "bench-recovery"
TARGET_SECONDS = 10.0
# PostgreSQL 15 flushes an idle backend's statistics within 10 s (PGSTAT_IDLE_INTERVAL): the
# counters are read once they have not moved for longer than that.
STATS_QUIET_SECONDS = 11.0
STATS_DEADLINE = 60.0
LABELS = {
    "sockets": "sockets open on A",
    "first_messages": "messages read before the kill",
    "missed": "messages missed (published through B after the kill)",
    "recovered_sockets": "sockets that recovered every missed message",
    "seconds_to_all_recovered": "SECONDS until every socket recovered (target 10)",
    "socket_p50_s": "per socket: reconnect -> last missed, p50 s",
    "socket_p99_s": "per socket: p99 s",
    "socket_max_s": "per socket: max s",
    "answer_p50_ms": "per socket: subscribe sent -> answer, p50 ms",
    "answer_p99_ms": "per socket: subscribe sent -> answer, p99 ms",
    "connect_p50_ms": "per socket: handshake + welcome, p50 ms",
    "connect_p99_ms": "per socket: handshake + welcome, p99 ms",
    "lost": "LOST (missed seqs never replayed)",
    "duplicates": "DUPLICATES",
    "out_of_order": "OUT OF ORDER",
    "answer_not_first": "ANSWER AFTER A MESSAGE",
    "not_recovered": "`recovered` not true",
    "reconnect_failures": "sockets that could not reconnect",
    "history_index_scans": "DB: scans of the (stream, seq) index",
    "history_rows_read": "DB: rows read through it",
    "message_seq_scans": "DB: sequential scans of the message table",
    "instance_stream_reads": "B: rt_stream_reads_total (its own count)",
    "db_transactions": "DB: transactions (all, bench database)",
    "db_rows_fetched": "DB: rows fetched (all, bench database)",
    "server_cpu_s": "CPU s of B during the storm",
}


# --- the client processes ----------------------------------------------------------------------


@dataclass
class Listener:
    """One socket's story: what it read on A, then its reconnection to B."""

    spec: SocketSpec
    ws: Any = None
    last_seq: int | None = None
    epoch: str | None = None
    first_seqs: list[int] = field(default_factory=list)
    closed: bool = False
    started: float = 0.0
    welcomed: float = 0.0
    answer: dict[str, Any] | None = None
    answer_at: float = 0.0
    before_answer: int = 0
    seqs: list[int] = field(default_factory=list)
    done_at: float | None = None
    error: str | None = None


def storm_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """A client process (multiprocessing spawn): its sockets, driven by the orchestrator's commands."""
    without_collector()
    try:
        asyncio.run(_storm_client(conn, cfg))
    except Exception as exc:
        conn.send(("failed", {"error": f"{type(exc).__name__}: {exc}"}))


async def _storm_client(conn: Connection, cfg: dict[str, Any]) -> None:
    specs = [SocketSpec(**s) for s in cfg["sockets"]]
    started = time.monotonic()
    topic = cfg["topic"]
    stream = f"topic:{topic}"
    socks, errors = await open_all(specs, topic, cfg["open_deadline"])
    listeners = [Listener(spec=s.spec, ws=s.ws) for s in socks]
    progress = asyncio.Event()

    def on_first(listener: Listener):
        def on_frame(arrived: float, raw: str) -> None:
            frame = orjson.loads(raw)
            if frame.get("type") == "message" and frame.get("stream") == stream:
                listener.first_seqs.append(frame.get("seq"))
                listener.last_seq, listener.epoch = frame.get("seq"), frame.get("epoch")
                progress.set()

        return on_frame

    async def watch_close(listener: Listener) -> None:
        await listener.ws.wait_closed()
        listener.closed = True
        progress.set()

    for listener in listeners:
        listener.ws.deliver_to(on_first(listener))
    watchers = [asyncio.create_task(watch_close(li)) for li in listeners]
    conn.send(
        (
            "ready",
            {
                "opened": len(listeners),
                "failed": len(specs) - len(listeners),
                "errors": errors[:5],
                "seconds": round(time.monotonic() - started, 2),
            },
        )
    )
    tickets: dict[str, str] = {}
    try:
        while True:
            command, arg = await recv_command(conn)
            if command == "close":
                break
            if command == "first":
                await _until(
                    progress,
                    lambda count=arg["count"]: all(len(li.first_seqs) >= count for li in listeners),
                    arg["deadline"],
                )
                conn.send(
                    (
                        "first",
                        {
                            "complete": sum(
                                1 for li in listeners if li.first_seqs == list(range(1, arg["count"] + 1))
                            ),
                            "epochs": sorted({str(li.epoch) for li in listeners}),
                        },
                    )
                )
            elif command == "closed":
                await _until(progress, lambda: all(li.closed for li in listeners), arg["deadline"])
                conn.send(("closed", {"closed": sum(1 for li in listeners if li.closed)}))
            elif command == "tickets":
                tickets = await _fetch_tickets(arg["port"], {li.spec.user: li.spec.token for li in listeners})
                conn.send(("tickets", {"tickets": len(tickets)}))
            elif command == "recover":
                conn.send(("recovered", await _storm(listeners, tickets, arg)))
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*(_close(li.ws) for li in listeners), return_exceptions=True)
        try:
            conn.send(("closed-all", {}))
        except (OSError, ValueError):
            pass


async def _until(event: asyncio.Event, predicate, deadline: float) -> None:
    limit = time.monotonic() + deadline
    while not predicate() and time.monotonic() < limit:
        event.clear()
        if predicate():
            return
        try:
            await asyncio.wait_for(event.wait(), min(1.0, max(0.01, limit - time.monotonic())))
        except TimeoutError:
            pass


async def _fetch_tickets(port: int, tokens: dict[str, str]) -> dict[str, str]:
    """One ticket per user from B, fetched before the storm (RT_TICKET_TTL is raised for that)."""
    out = {}
    async with httpx.AsyncClient(timeout=OPEN_TIMEOUT) as http:
        for user, token in tokens.items():
            response = await http.post(
                f"http://127.0.0.1:{port}/api/v1/ws-tickets/", headers={"Authorization": f"Token {token}"}
            )
            response.raise_for_status()
            out[user] = response.json()["ticket"]
    return out


async def _close(ws: Any) -> None:
    try:
        await asyncio.wait_for(ws.close(), 5)
    except Exception:
        pass


async def _storm(listeners: list[Listener], tickets: dict[str, str], arg: dict[str, Any]) -> dict[str, Any]:
    """Every socket reconnects to B at once and subscribes with `since`; until each has `final`."""
    final = arg["final"]
    gate = asyncio.Semaphore(arg["concurrency"])
    done = asyncio.Event()
    state = {"done": 0}
    storm_started = time.time()

    def on_frame_of(listener: Listener):
        def on_frame(arrived: float, raw: str) -> None:
            frame = orjson.loads(raw)
            kind = frame.get("type")
            if kind == "subscribed" and listener.answer is None:
                listener.answer, listener.answer_at = frame, arrived
                listener.before_answer = len(listener.seqs)
            elif kind == "message" and frame.get("stream") == f"topic:{arg['topic']}":
                listener.seqs.append(frame.get("seq"))
                if listener.done_at is None and frame.get("seq") == final:
                    listener.done_at = arrived
                    state["done"] += 1
                    if state["done"] >= len(listeners):
                        done.set()
            elif kind == "error":
                listener.error = f"error frame: {frame}"[:300]

        return on_frame

    async def one(listener: Listener) -> None:
        async with gate:
            listener.started = time.time()
            try:
                url = f"ws://127.0.0.1:{arg['port']}/ws/?ticket={tickets[listener.spec.user]}"
                listener.ws = await wsclient.connect(url, OPEN_TIMEOUT)
                welcome = orjson.loads(await asyncio.wait_for(listener.ws.recv(), OPEN_TIMEOUT))
                listener.welcomed = time.time()
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"first frame is not a welcome: {welcome}")
                listener.ws.deliver_to(on_frame_of(listener))
                since = {"seq": listener.last_seq, "epoch": listener.epoch}
                await listener.ws.send(
                    orjson.dumps({"type": "subscribe", "topic": arg["topic"], "since": since}).decode()
                )
            except Exception as exc:
                listener.error = f"{type(exc).__name__}: {exc}"[:300]
                state["done"] += 1
                if state["done"] >= len(listeners):
                    done.set()

    for listener in listeners:
        listener.seqs, listener.answer, listener.done_at, listener.error = [], None, None, None
    tasks = [asyncio.create_task(one(li)) for li in listeners]
    try:
        await asyncio.wait_for(done.wait(), arg["deadline"])
        timed_out = False
    except TimeoutError:
        timed_out = True
    await asyncio.sleep(GRACE_SECONDS)  # deliberate: late duplicates arrive now
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "storm_started": storm_started,
        "timed_out": timed_out,
        "sockets": [_summary(li, final) for li in listeners],
    }


def _summary(listener: Listener, final: int) -> dict[str, Any]:
    expected = list(range((listener.last_seq or 0) + 1, final + 1))
    counts = collections.Counter(listener.seqs)
    answer = listener.answer or {}
    return {
        "started": listener.started,
        "welcomed": listener.welcomed or None,
        "answer_at": listener.answer_at or None,
        "done_at": listener.done_at,
        "recovered": answer.get("recovered"),
        "answer_first": listener.answer is not None and listener.before_answer == 0,
        "lost": len(set(expected) - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "in_order": listener.seqs == sorted(set(listener.seqs)),
        "exact": listener.seqs[: len(expected)] == expected,
        "error": listener.error,
    }


# --- the orchestrator ---------------------------------------------------------------------------


async def publish(url: str, token: str, topic: str, count: int, tag: str) -> list[dict[str, Any]]:
    """`count` messages to the topic, one after another: their 202 records."""
    records = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for n in range(count):
            response = await http.post(
                "/api/v1/messages/",
                json={"topic": topic, "event": tag, "payload": {"n": n}},
                headers={"Authorization": f"Token {token}"},
            )
            if response.status_code != 202:
                raise RuntimeError(f"publish {tag} {n}: {response.status_code} {response.text[:300]}")
            records.append(response.json())
    return records


DATABASE_SQL = """
SELECT xact_commit + xact_rollback, tup_fetched FROM pg_stat_database WHERE datname = %s
"""
TABLES_SQL = """
SELECT
  (SELECT coalesce(seq_scan, 0) FROM pg_stat_user_tables WHERE relname = 'notifications_message'),
  (SELECT coalesce(json_object_agg(i.indexrelname, json_build_array(i.idx_scan, i.idx_tup_read,
          pg_get_indexdef(i.indexrelid))), '{}')
     FROM pg_stat_user_indexes i WHERE i.relname IN ('notifications_message', 'notifications_stream')),
  (SELECT coalesce(json_object_agg(t.relname, json_build_array(coalesce(t.seq_scan, 0),
          coalesce(t.idx_scan, 0), t.n_tup_ins)), '{}') FROM pg_stat_user_tables t)
"""


class DatabaseStats:
    """PostgreSQL's cumulative statistics of the benchmark's database, read once they settle.

    The database-wide counters are read from a connection to `postgres`, so that polling them
    adds nothing to the benchmark database's own; the table and index counters (only readable
    from inside that database) are read once per snapshot, which adds one transaction and a few
    catalog rows to the next snapshot's totals.
    """

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit, urlunsplit

        import psycopg

        parts = urlsplit(url.replace("postgres://", "postgresql://", 1))
        self.name = parts.path.lstrip("/")
        admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
        self.admin = psycopg.connect(admin, autocommit=True)
        self.inside = psycopg.connect(urlunsplit(parts), autocommit=True)

    def _database(self) -> tuple[int, int]:
        return tuple(self.admin.execute(DATABASE_SQL, (self.name,)).fetchone())

    def settled(self) -> tuple[dict[str, Any], bool]:
        """The counters once unchanged for STATS_QUIET_SECONDS (or at STATS_DEADLINE): (stats, settled)."""
        limit = time.monotonic() + STATS_DEADLINE
        last = self._database()
        since = time.monotonic()
        quiet = False
        while time.monotonic() < limit:
            time.sleep(1.0)  # polling PostgreSQL's statistics until they stop moving
            now = self._database()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= STATS_QUIET_SECONDS:
                quiet = True
                break
        seq_scans, indexes, tables = self.inside.execute(TABLES_SQL).fetchone()
        stats = {
            "xacts": last[0],
            "fetched": last[1],
            "seq_scans": seq_scans,
            "indexes": indexes,
            "tables": tables,
        }
        return stats, quiet

    def close(self) -> None:
        self.admin.close()
        self.inside.close()


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    indexes = {}
    for name, (scans, rows, definition) in after["indexes"].items():
        was = before["indexes"].get(name, [0, 0, definition])
        indexes[name] = {"scans": scans - was[0], "rows": rows - was[1], "definition": definition}
    history = [
        v
        for v in indexes.values()
        if "notifications_message" in v["definition"] and "(stream" in v["definition"]
    ]
    return {
        # Less the one transaction of our own table-statistics read.
        "db_transactions": after["xacts"] - before["xacts"] - 1,
        "db_rows_fetched": after["fetched"] - before["fetched"],
        "message_seq_scans": after["seq_scans"] - before["seq_scans"],
        "history_index_scans": sum(v["scans"] for v in history) if history else None,
        "history_rows_read": sum(v["rows"] for v in history) if history else None,
        "indexes": {k: v for k, v in indexes.items() if v["scans"]},
        # Per table: [scans (sequential + index), rows inserted], where anything moved.
        "tables": {
            name: [
                now[0] + now[1] - sum(before["tables"].get(name, [0, 0, 0])[:2]),
                now[2] - before["tables"].get(name, [0, 0, 0])[2],
            ]
            for name, now in after["tables"].items()
            if now != before["tables"].get(name)
        },
    }


def recovery_metrics(url: str) -> dict[str, float]:
    """B's own counters of streams, history and recovery (`rt_stream_reads_total`, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(word in sample.name for word in ("stream", "history", "recover", "replay")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "instance")
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def run_storm(args: argparse.Namespace, db_url: str, users: dict[str, Any], topic: str) -> dict[str, Any]:
    extra = {"RT_TICKET_TTL": "600", "RT_INSTANCE_QUEUE_EXPIRES_MS": "60000"}
    deployment = Deployment("project", db_url, 2, extra)
    pool: ClientPool | None = None
    stats: DatabaseStats | None = None
    notes: list[str] = []
    try:
        deployment.start()
        asyncio.run(warm_up(deployment, users, publish=True))
        web_a, web_b = deployment.webs
        shares = split_sockets(args.sockets, [web_a.port], users["listeners"], args.client_procs)
        pool = ClientPool(
            storm_main,
            [{"sockets": share, "topic": topic, "open_deadline": args.phase_timeout} for share in shares],
        )
        ready = pool.collect("ready", args.phase_timeout + 30)
        opened = sum(r["opened"] for r in ready)
        if sum(r["failed"] for r in ready):
            notes.append(f"sockets failed to open on A: {[e for r in ready for e in r['errors']][:3]}")
        log(f"{opened} sockets on {web_a.name}; publishing {args.first} messages through {web_b.name}")

        first = asyncio.run(publish(web_b.url, users["publisher"], topic, args.first, "first"))
        pool.send("first", {"count": args.first, "deadline": args.phase_timeout})
        got_first = pool.collect("first", args.phase_timeout + 30)
        complete_first = sum(r["complete"] for r in got_first)
        epochs = sorted({e for r in got_first for e in r["epochs"]})
        if complete_first < opened or len(epochs) != 1:
            notes.append(
                f"before the kill: {complete_first} of {opened} sockets read seq 1..{args.first}; epochs {epochs}"
            )

        log(f"SIGKILL {web_a.name}")
        web_a.kill()
        pool.send("closed", {"deadline": 60})
        closed = sum(r["closed"] for r in pool.collect("closed", 90))
        log(f"{closed} sockets closed; publishing {args.missed} messages through {web_b.name}")
        missed = asyncio.run(publish(web_b.url, users["publisher"], topic, args.missed, "missed"))
        seqs = [r.get("seq") for r in missed]
        if not all(isinstance(s, int) for s in seqs):
            raise RuntimeError(f"the 202 records carry no seq: {missed[0]}")
        final = max(seqs)
        if seqs != list(range(first[-1].get("seq", 0) + 1, final + 1)):
            notes.append(
                f"the missed messages are not numbered after the first ones: {seqs[:3]}..{seqs[-3:]}"
            )

        pool.send("tickets", {"port": web_b.port})
        pool.collect("tickets", args.phase_timeout)
        stats = DatabaseStats(db_url)
        before, settled_before = stats.settled()
        metrics_before = recovery_metrics(web_b.url)
        cpu_before = common.cpu_of([web_b])

        log(f"reconnect storm: {opened} sockets to {web_b.name}, subscribe since seq {args.first}")
        sent = time.time()
        pool.send(
            "recover",
            {
                "port": web_b.port,
                "topic": topic,
                "final": final,
                "deadline": args.phase_timeout,
                "concurrency": args.connect_concurrency,
            },
        )
        results = pool.collect("recovered", args.phase_timeout + 60)
        server_cpu = common.cpu_of([web_b]) - cpu_before
        after, settled_after = stats.settled()
        metrics_after = recovery_metrics(web_b.url)
        if not (settled_before and settled_after):
            notes.append(
                "PostgreSQL's statistics were still moving when read: the database figures are approximate"
            )

        sockets = [s for r in results for s in r["sockets"]]
        done = [s["done_at"] for s in sockets if s["done_at"] is not None]
        recovered = [s for s in sockets if s["done_at"] is not None and s["lost"] == 0]
        per_socket = sorted(s["done_at"] - s["started"] for s in sockets if s["done_at"] is not None)
        answers = sorted(s["answer_at"] - s["welcomed"] for s in sockets if s["answer_at"] and s["welcomed"])
        connects = sorted(s["welcomed"] - s["started"] for s in sockets if s["welcomed"])
        database = stats_delta(before, after)
        metrics = {
            "sockets": opened,
            "first_messages": args.first,
            "missed": len(missed),
            "recovered_sockets": len(recovered),
            "seconds_to_all_recovered": round(max(done) - sent, 2)
            if len(recovered) == len(sockets) and done
            else None,
            "socket_p50_s": _round(percentile(per_socket, 50)),
            "socket_p99_s": _round(percentile(per_socket, 99)),
            "socket_max_s": _round(per_socket[-1] if per_socket else None),
            "answer_p50_ms": ms(percentile(answers, 50)),
            "answer_p99_ms": ms(percentile(answers, 99)),
            "connect_p50_ms": ms(percentile(connects, 50)),
            "connect_p99_ms": ms(percentile(connects, 99)),
            "lost": sum(s["lost"] for s in sockets),
            "duplicates": sum(s["duplicates"] for s in sockets),
            "out_of_order": sum(1 for s in sockets if not s["in_order"]),
            "answer_not_first": sum(1 for s in sockets if not s["answer_first"]),
            "not_recovered": sum(1 for s in sockets if s["recovered"] is not True),
            "reconnect_failures": sum(1 for s in sockets if s["error"]),
            "history_index_scans": database["history_index_scans"],
            "history_rows_read": database["history_rows_read"],
            "message_seq_scans": database["message_seq_scans"],
            "db_transactions": database["db_transactions"],
            "db_rows_fetched": database["db_rows_fetched"],
            "server_cpu_s": round(server_cpu, 2),
        }
        if metrics["seconds_to_all_recovered"] is not None:
            met = metrics["seconds_to_all_recovered"] <= TARGET_SECONDS
            notes.append(f"target {TARGET_SECONDS:.0f} s for every socket: {'met' if met else 'MISSED'}")
        if any(r["timed_out"] for r in results):
            notes.append(f"the storm stopped at the {args.phase_timeout:.0f} s phase limit")
        errors = [s["error"] for s in sockets if s["error"]]
        if errors:
            notes.append(f"{len(errors)} socket errors, e.g. {errors[:3]}")
        notes.append(f"database indexes scanned during the storm: {database['indexes']}")
        notes.append(f"tables touched during the storm, [scans, rows inserted]: {database['tables']}")
        moved = {
            k: v - metrics_before.get(k, 0) for k, v in metrics_after.items() if v != metrics_before.get(k, 0)
        }
        notes.append(f"B's stream/history counters moved: {moved or 'none exported'}")
        reads = [v for k, v in moved.items() if k.startswith("rt_stream_reads_total")]
        metrics["instance_stream_reads"] = sum(reads) if reads else None
        return {"metrics": metrics, "notes": notes, "database": database, "instance_metrics": moved}
    finally:
        if stats is not None:
            stats.close()
        if pool is not None:
            pool.stop()
        deployment.close(notes)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", type=int, default=1000, help="sockets on instance A")
    parser.add_argument("--first", type=int, default=10, help="messages every socket reads before the kill")
    parser.add_argument("--missed", type=int, default=100, help="messages published through B after the kill")
    parser.add_argument("--users", type=int, default=100, help="listener users the sockets belong to")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes holding the sockets")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=100,
        help="handshakes in flight per client process in the storm",
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE, help="PostgreSQL, created and dropped")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--runs", type=int, default=1, help="repeat, report median and min-max")
    parser.add_argument("--phase-timeout", type=float, default=PHASE_TIMEOUT)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--json-out", help="also write the JSON report to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = common.raise_fd_limit(max(4096, 2 * args.sockets + 1024))
    if limit < args.sockets + 256:
        log(f"open-files limit {limit} is too low for {args.sockets} sockets")
    if not args.database_url.startswith("postgres"):
        raise SystemExit(
            "the storm's database figures come from PostgreSQL's statistics: pass a postgres:// URL"
        )
    db = common.BenchDatabase.create(args.database_url, args.keep_database)
    params = {
        "sockets": args.sockets,
        "first": args.first,
        "missed": args.missed,
        "instances": 2,
        "client_procs": args.client_procs,
        "connect_concurrency": args.connect_concurrency,
        "database": db.kind,
    }
    report = Report("recovery", params)
    try:
        users = common.prepare_project_database(db, args.users)
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            run = run_storm(args, db.url, users, f"{TOPIC}-{index + 1}")
            m = run["metrics"]
            for key in (
                "lost",
                "duplicates",
                "out_of_order",
                "answer_not_first",
                "not_recovered",
                "reconnect_failures",
            ):
                if m.get(key):
                    report.violations.append(
                        f"run {index + 1}: {key.upper()} = {m[key]} (of {m['sockets']} sockets)"
                    )
            if m["sockets"] < args.sockets:
                report.violations.append(
                    f"run {index + 1}: only {m['sockets']} of {args.sockets} sockets opened"
                )
            report.runs.append(run)
    finally:
        db.drop()
    return common.emit(report, LABELS, args.json, args.json_out)


if __name__ == "__main__":
    if __package__ in (None, ""):
        # The client processes are spawned: they must find storm_main as bench.recovery.storm_main.
        from bench.recovery import main as package_main

        sys.exit(package_main())
    sys.exit(main())
