"""Publish API benchmark: POSTs to the publish endpoints, alone or side by side with the baseline.

    .venv/bin/python bench/publish_api.py --requests 2000 --concurrency 8
    .venv/bin/python bench/publish_api.py --sockets 10                 (10 sockets on the topic)
    .venv/bin/python bench/publish_api.py --batch 100 --sockets 100    (batches to 100 users)
    .venv/bin/python bench/publish_api.py --target baseline            (the bare async view)
    .venv/bin/python bench/publish_api.py --target baseline --view drf (the baseline's DRF view)
    .venv/bin/python bench/publish_api.py --view drf                   (the project without its fast path)
    .venv/bin/python bench/publish_api.py --side-by-side --rounds 5    (all of them, interleaved)

Single mode: `--requests` POSTs of one message to one topic by `--concurrency` clients; with
`--sockets N`, N sockets (in client processes) subscribed to that topic count every delivery.
Batch mode (project only): `--requests` POSTs to `/api/v1/messages/batch/`, each of `--batch`
messages to `--batch` different users (the sockets spread over those users). Every request must
answer 202; requests/s and messages/s are counted from the first request to the last answer;
latency is POST start -> answer, and with sockets POST start -> arrival. "Server CPU" is the
web instance's; PostgreSQL's and the broker's is counted apart (`common.service_cpu`).

`--side-by-side` starts the project (fast path), the project with RT_FAST_PUBLISH=0 (every
request through Django and DRF, as before the fast path), and the baseline, each with its own
sockets, and drives them in turns, `--rounds` times `--requests` requests each (batches:
`--batch-requests`, by default a tenth as many): on a shared machine whose load changes by the
minute, every variant sees the same conditions, and the ratios between them are what to read.
A batch turn of a tenth is short (40 requests by 8 clients: 5 waves, the first and last of them
half empty) and reads mostly its ramp; `--batch-requests 100` makes it last about as long as a
single-publish turn, and reads the steady rate.
"""

import argparse
import asyncio
import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench import common
from bench.common import Report, log, ms, percentile
from bench.deploy import Deployment, warm_up
from bench.fanout import TOPIC, analyse, await_listeners, start_listeners
from bench.sockets import ClientPool

LABELS = {
    "requests": "requests",
    "accepted": "accepted (202)",
    "failed": "NOT accepted",
    "requests_per_s": "requests/s",
    "messages_per_s": "messages/s (accepted)",
    "latency_p50_ms": "latency p50 ms",
    "latency_p99_ms": "latency p99 ms",
    "latency_max_ms": "latency max ms",
    "server_cpu_ms_per_request": "server CPU ms per request",
    "server_cpu_us_per_message": "server CPU us per message",
    "services_cpu_us_per_message": "PostgreSQL + broker CPU us per message",
    "sockets": "sockets open",
    "expected": "deliveries expected",
    "delivered": "deliveries (distinct)",
    "lost": "LOST",
    "duplicates": "DUPLICATES",
    "out_of_order": "out of order (vs. 202 order)",
    "delivery_p50_ms": "delivery p50 ms (POST -> arrival)",
    "delivery_p99_ms": "delivery p99 ms",
    "delivery_max_ms": "delivery max ms",
}
# The paths of the publish views: the project's endpoints, the baseline's two views.
PATHS = {
    ("project", "fast"): "/api/v1/messages/",
    ("project", "drf"): "/api/v1/messages/",
    ("baseline", "async"): "/api/v1/messages/",
    ("baseline", "drf"): "/drf/api/v1/messages/",
}
BATCH_PATH = "/api/v1/messages/batch/"
# consumers_app.consumer.RESUME_WINDOW_SECONDS, and a little more.
RESUME_HOLD_SECONDS = 2.2
# Side by side, a turn starts once every deployment's web processes use less than this share of a
# core (measured over QUIET_INTERVAL_SECONDS).
QUIET_CORE_SHARE = 0.1
QUIET_INTERVAL_SECONDS = 0.5


@dataclass
class Variant:
    """One way to publish: a deployment, a view, a topic (or batches to users), its sockets."""

    name: str
    target: str
    view: str
    batch: int
    topic: str
    deployment: Deployment
    token: str | None
    recipients: list[str] = field(default_factory=list)
    pool: ClientPool | None = None
    opened: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0
    services_cpu: float = 0.0  # PostgreSQL's and the broker's (see common.service_cpu)
    next_seq: int = 0

    @property
    def path(self) -> str:
        return BATCH_PATH if self.batch else PATHS[(self.target, self.view)]

    def body(self, sent: float, pad: str) -> tuple[list[int], dict[str, Any]]:
        """The next request's seqs and body."""

        def item(seq: int, to: dict[str, Any]) -> dict[str, Any]:
            payload: dict[str, Any] = {"seq": seq, "sent_at": sent}
            if pad:
                payload["pad"] = pad
            return to | {"event": "bench", "payload": payload}

        if self.batch:
            seqs = list(range(self.next_seq, self.next_seq + self.batch))
            body: dict[str, Any] = {
                "messages": [item(s, {"user": self.recipients[s % self.batch]}) for s in seqs]
            }
        else:
            seqs = [self.next_seq]
            body = item(self.next_seq, {"topic": self.topic})
        self.next_seq += len(seqs)
        return seqs, body


async def warm(variant: Variant) -> None:
    """One request of the variant's kind, not counted (its payload has no seq): the first batch
    creates its recipients' streams and the sockets' positions, a cost of the first second only,
    which otherwise was most of a short run's delivery p99."""
    headers = {"Authorization": f"Token {variant.token}"} if variant.token else {}
    warmup = {"event": "warmup", "payload": {"warmup": True}}
    if variant.batch:
        body: dict[str, Any] = {"messages": [{"user": name} | warmup for name in variant.recipients]}
    else:
        body = {"topic": variant.topic} | warmup
    async with httpx.AsyncClient(base_url=variant.deployment.webs[0].url, timeout=60) as http:
        response = await http.post(variant.path, json=body, headers=headers)
    if response.status_code != 202:
        raise RuntimeError(f"{variant.name} warm-up: {response.status_code} {response.text[:300]}")


async def drive(variant: Variant, requests: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`requests` POSTs by `args.concurrency` clients (batches: `args.batch_concurrency`); one
    record per request."""
    headers = {"Authorization": f"Token {variant.token}"} if variant.token else {}
    pad = "x" * args.payload_bytes
    records: list[dict[str, Any]] = []
    concurrency = args.batch_concurrency if variant.batch else args.concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    remaining = iter(range(requests))
    async with httpx.AsyncClient(base_url=variant.deployment.webs[0].url, timeout=60, limits=limits) as http:

        async def client() -> None:
            for _ in remaining:
                sent = time.time()
                seqs, body = variant.body(sent, pad)
                try:
                    response = await http.post(variant.path, json=body, headers=headers)
                    status: int | str = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                records.append({"seqs": seqs, "sent": sent, "acked": time.time(), "status": status})

        try:
            async with asyncio.timeout(args.phase_timeout):
                await asyncio.gather(*(client() for _ in range(concurrency)))
        except TimeoutError:
            log(
                f"publishing stopped by the {args.phase_timeout:.0f}s phase limit after {len(records)} requests"
            )
    return records


def wait_quiet(deployments: list[Deployment], timeout: float = 20.0) -> float:
    """Wait until the deployments' web processes are idle (under QUIET_CORE_SHARE of a core over
    half a second), at most `timeout` seconds; the seconds waited.

    Side by side, a variant that delivers late (the baseline's sockets get their messages seconds
    after the 202) keeps its processes busy into the next variant's turn, which then pays for it.
    """
    started = time.monotonic()
    procs = [web for deployment in deployments for web in deployment.webs]
    while time.monotonic() - started < timeout:
        before = common.cpu_of(procs)
        time.sleep(QUIET_INTERVAL_SECONDS)
        if common.cpu_of(procs) - before < QUIET_CORE_SHARE * QUIET_INTERVAL_SECONDS:
            break
    return time.monotonic() - started


def run_slice(variant: Variant, requests: int, args: argparse.Namespace) -> None:
    """Drive one variant for `requests` requests, adding to its records, seconds and CPU."""
    cpu_before = common.cpu_of(variant.deployment.webs)
    services_before = common.service_cpu()
    records = asyncio.run(drive(variant, requests, args))
    variant.cpu += common.cpu_of(variant.deployment.webs) - cpu_before
    variant.services_cpu += sum(common.service_cpu_since(services_before).values())
    if records:
        variant.seconds += max(r["acked"] for r in records) - min(r["sent"] for r in records)
    variant.records += records


def analyse_batches(
    records: list[dict[str, Any]], results: list[dict[str, Any]], users: int
) -> dict[str, Any]:
    """Deliveries of batch messages, each to the sockets of one user (message seq s goes to user
    s % users): distinct, lost, duplicated, out of order (an earlier arrival POSTed after this
    message's 202 came back), latency."""
    sent: dict[int, tuple[float, float]] = {}
    for record in records:
        if record["status"] == 202:
            for seq in record["seqs"]:
                sent[seq] = (record["sent"], record["acked"])
    sockets = [s for r in results for s in r["sockets"]]
    per_user = {
        index: len(sockets) // users + (1 if index < len(sockets) % users else 0) for index in range(users)
    }
    expected = sum(per_user[seq % users] for seq in sent)
    delivered = duplicates = out_of_order = unexpected = 0
    latencies: list[float] = []
    for sock in sockets:
        seen: set[int] = set()
        newest_sent = 0.0
        for seq, arrived in sock["arrivals"]:
            times = sent.get(seq)
            if times is None:
                unexpected += 1
                continue
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            delivered += 1
            latencies.append(arrived - times[0])
            if newest_sent > times[1]:
                out_of_order += 1
            newest_sent = max(newest_sent, times[0])
    latencies.sort()
    return {
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "out_of_order": out_of_order,
        "delivery_p50_ms": ms(percentile(latencies, 50)),
        "delivery_p99_ms": ms(percentile(latencies, 99)),
        "delivery_max_ms": ms(latencies[-1] if latencies else None),
    }


def figures(variant: Variant, args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    """The variant's metrics; with sockets, after every delivery arrived (or the clients gave up)."""
    records = variant.records
    accepted = [r for r in records if r["status"] == 202]
    messages = sum(len(r["seqs"]) for r in accepted)
    latencies = sorted(r["acked"] - r["sent"] for r in accepted)
    statuses = collections.Counter(str(r["status"]) for r in records)
    if len(statuses) > 1 or "202" not in statuses:
        notes.append(f"{variant.name} answers: {dict(statuses)}")
    seconds = variant.seconds
    metrics: dict[str, Any] = {
        "requests": len(records),
        "accepted": len(accepted),
        "failed": len(records) - len(accepted),
        "requests_per_s": round(len(records) / seconds, 1) if seconds > 0 else None,
        "messages_per_s": round(messages / seconds, 1) if seconds > 0 else None,
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "latency_max_ms": ms(latencies[-1] if latencies else None),
        "server_cpu_ms_per_request": round(variant.cpu / len(records) * 1000, 2) if records else None,
        "server_cpu_us_per_message": round(variant.cpu / messages * 1e6, 1) if messages else None,
        "services_cpu_us_per_message": round(variant.services_cpu / messages * 1e6, 1) if messages else None,
    }
    if variant.pool is None:
        return metrics
    # A batch holds one message per user, and the sockets are spread evenly over the users.
    per_socket = len(accepted) * variant.batch // variant.opened if variant.batch else len(accepted)
    variant.pool.send(
        "expect", {"per_socket": per_socket, "deadline": args.phase_timeout, "quiet": args.quiet}
    )
    results = variant.pool.collect("result", args.phase_timeout + 30)
    if variant.batch:
        delivery = analyse_batches(records, results, variant.batch)
    else:
        found = analyse([r | {"seq": r["seqs"][0]} for r in records], results)
        delivery = {
            key: found[key] for key in ("expected", "delivered", "lost", "duplicates", "out_of_order")
        }
        delivery |= {
            "delivery_p50_ms": found["latency_p50_ms"],
            "delivery_p99_ms": found["latency_p99_ms"],
            "delivery_max_ms": found["latency_max_ms"],
        }
    if any(r["timed_out"] for r in results):
        notes.append(f"{variant.name}: the clients stopped waiting before every delivery arrived")
    return metrics | {"sockets": variant.opened} | delivery


def open_sockets(
    variant: Variant, sockets: int, listeners: list[list[Any]], args: argparse.Namespace, notes: list[str]
) -> None:
    shim = argparse.Namespace(client_procs=args.client_procs, phase_timeout=args.phase_timeout)
    topic = None if variant.batch else variant.topic
    variant.pool = start_listeners(shim, sockets, variant.deployment.webs, {"listeners": listeners}, topic)
    _, seconds, variant.opened, _ = await_listeners(variant.pool, shim, notes)
    opened_at = time.monotonic()
    log(f"{variant.name}: {variant.opened} sockets open in {seconds:.1f}s")
    asyncio.run(warm(variant))
    # A new socket's own streams are held until it sends a frame or RESUME_WINDOW_SECONDS pass
    # (consumers_app/consumer.py), so that a `resume` is answered before live messages; these
    # sockets send nothing, and what reached them meanwhile would count as held, not as slow.
    time.sleep(max(0.0, RESUME_HOLD_SECONDS - (time.monotonic() - opened_at)))


def start(
    target: str, view: str, db_url: str | None, users: dict[str, Any], started: list[Deployment]
) -> Deployment:
    extra = {"RT_FAST_PUBLISH": "0"} if (target, view) == ("project", "drf") else {}
    deployment = Deployment(target, db_url, 1, extra)
    started.append(deployment)
    deployment.start()
    asyncio.run(warm_up(deployment, users, publish=True))
    return deployment


def run_publish(args: argparse.Namespace, db_url: str | None, users: dict[str, Any]) -> dict[str, Any]:
    """One configuration alone (`--target`, `--view`, `--batch`)."""
    notes: list[str] = []
    started: list[Deployment] = []
    variant: Variant | None = None
    try:
        deployment = start(args.target, args.view, db_url, users, started)
        listeners = (
            users["listeners"][: args.batch] if args.batch else users["listeners"][-max(args.sockets, 1) :]
        )
        variant = Variant(
            name=f"{args.target}-{args.view}",
            target=args.target,
            view=args.view,
            batch=args.batch,
            topic=TOPIC,
            deployment=deployment,
            token=users["publisher"],
            recipients=[name for name, _ in listeners],
        )
        if args.sockets:
            open_sockets(variant, args.sockets, listeners, args, notes)
        else:
            asyncio.run(warm(variant))
        run_slice(variant, args.requests, args)
        return {"metrics": figures(variant, args, notes), "notes": notes}
    finally:
        if variant is not None and variant.pool is not None:
            variant.pool.stop()
        for deployment in started:
            deployment.close(notes)


def batch_requests(args: argparse.Namespace) -> int:
    """Batch requests per side-by-side turn."""
    return args.batch_requests or max(1, args.requests // 10)


SIDE_BY_SIDE = [
    # name, target, view, batch, topic
    ("project", "project", "fast", 0, "bench"),
    ("project-drf", "project", "drf", 0, "bench-drf"),
    ("project-batch", "project", "fast", 100, "bench-batch"),
    ("baseline-async", "baseline", "async", 0, "bench"),
    ("baseline-drf", "baseline", "drf", 0, "bench-drf"),
]


def run_side_by_side(
    args: argparse.Namespace, db_url: str, users: dict[str, Any], baseline: dict[str, Any]
) -> dict[str, Any]:
    """Every variant of SIDE_BY_SIDE, driven in turns; {name: metrics}."""
    notes: list[str] = []
    started: list[Deployment] = []
    variants: list[Variant] = []
    single = users["listeners"][args.batch_size :][: args.sockets]
    try:
        by_key: dict[tuple[str, str], Deployment] = {}
        for name, target, view, batch, topic in SIDE_BY_SIDE:
            key = (target, "drf" if view == "drf" and target == "project" else "any")
            if key not in by_key:
                by_key[key] = start(
                    target,
                    view,
                    db_url if target == "project" else None,
                    users if target == "project" else baseline,
                    started,
                )
            listeners = (
                users["listeners"][:batch]
                if batch
                else (single if target == "project" else baseline["listeners"])
            )
            variant = Variant(
                name=name,
                target=target,
                view=view,
                batch=batch,
                topic=topic,
                deployment=by_key[key],
                token=users["publisher"] if target == "project" else None,
                recipients=[n for n, _ in listeners],
            )
            open_sockets(variant, batch or args.sockets, listeners, args, notes)
            variants.append(variant)
        for round_ in range(args.rounds):
            for variant in variants:
                requests = batch_requests(args) if variant.batch else args.requests
                waited = wait_quiet(started)
                log(
                    f"round {round_ + 1}/{args.rounds}: {variant.name}, {requests} requests (quiet after {waited:.1f}s)"
                )
                run_slice(variant, requests, args)
        return {"variants": {v.name: figures(v, args, notes) for v in variants}, "notes": notes}
    finally:
        for variant in variants:
            if variant.pool is not None:
                variant.pool.stop()
        for deployment in started:
            deployment.close(notes)


SIDE_LABELS = [
    ("requests_per_s", "requests/s"),
    ("messages_per_s", "messages/s"),
    ("latency_p50_ms", "POST p50 ms"),
    ("latency_p99_ms", "POST p99 ms"),
    ("server_cpu_ms_per_request", "server CPU ms/request"),
    ("server_cpu_us_per_message", "server CPU us/message"),
    ("services_cpu_us_per_message", "PostgreSQL + broker CPU us/message"),
    ("delivery_p50_ms", "delivery p50 ms"),
    ("delivery_p99_ms", "delivery p99 ms"),
    ("lost", "lost"),
    ("duplicates", "duplicates"),
    ("out_of_order", "out of order"),
]


def side_table(variants: dict[str, dict[str, Any]]) -> str:
    names = list(variants)
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for key, label in SIDE_LABELS:
        cells = [variants[n].get(key) for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:,}" for c in cells) + " |")
    project, bare, drf = variants["project"], variants["baseline-async"], variants["baseline-drf"]

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    lines += [
        "",
        "| ratio (same run) | value |",
        "| --- | ---: |",
        f"| project / baseline bare async view, requests/s | {ratio(project['requests_per_s'], bare['requests_per_s'])} |",
        f"| project / baseline DRF view, requests/s | {ratio(project['requests_per_s'], drf['requests_per_s'])} |",
        f"| project / project through DRF (before), requests/s | {ratio(project['requests_per_s'], variants['project-drf']['requests_per_s'])} |",
        f"| project batches, messages/s / bare async view, requests/s | {ratio(variants['project-batch']['messages_per_s'], bare['requests_per_s'])} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["project", "baseline"], default="project")
    parser.add_argument(
        "--view",
        choices=["fast", "drf", "async"],
        help="project: fast (default; the ASGI fast path) or drf (RT_FAST_PUBLISH=0); "
        "baseline: async (default; the bare async view) or drf (a plain DRF view)",
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        default=2,
        help="clients posting batches at once (each of --batch messages)",
    )
    parser.add_argument("--payload-bytes", type=int, default=0)
    parser.add_argument("--sockets", type=int, default=0, help="sockets listening (spread over the users)")
    parser.add_argument("--batch", type=int, default=0, help="messages per request, to as many users")
    parser.add_argument("--side-by-side", action="store_true", help="every variant, in turns (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="--side-by-side: turns per variant")
    parser.add_argument("--batch-size", type=int, default=100, help="--side-by-side: messages per batch")
    parser.add_argument(
        "--batch-requests",
        type=int,
        help="--side-by-side: batch requests per turn (default: a tenth of --requests)",
    )
    parser.add_argument("--client-procs", type=int, default=1, help="client processes holding the sockets")
    parser.add_argument(
        "--quiet", type=float, default=20.0, help="stop waiting after this many silent seconds"
    )
    parser.add_argument(
        "--database-url", help="postgres://.../rt_bench (created and dropped); default SQLite"
    )
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="seconds the requests may take")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    args.view = args.view or ("fast" if args.target == "project" else "async")
    if (args.target, args.view) not in PATHS:
        parser.error(f"--view {args.view} is not a view of the {args.target}")
    if args.batch and args.target != "project":
        parser.error("--batch: the baseline has no batch endpoint")
    if args.batch and args.sockets and args.sockets % args.batch:
        parser.error("--sockets must be a multiple of --batch (sockets are spread over the batch's users)")
    if args.side_by_side:
        args.sockets = args.sockets or 10
        SIDE_BY_SIDE[2] = SIDE_BY_SIDE[2][:3] + (args.batch_size,) + SIDE_BY_SIDE[2][4:]

    project = args.target == "project" or args.side_by_side
    db = common.BenchDatabase.create(args.database_url, args.keep_database) if project else None
    params: dict[str, Any] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "sockets": args.sockets,
        "database": db.kind if db else "none (redis)",
    }
    if args.side_by_side:
        params |= {
            "side_by_side": True,
            "rounds": args.rounds,
            "batch": args.batch_size,
            "batch_concurrency": args.batch_concurrency,
            "batch_requests": batch_requests(args),
        }
    else:
        params |= {"target": args.target, "view": args.view, "batch": args.batch or None}
        if args.batch:
            params["batch_concurrency"] = args.batch_concurrency
    report = Report("publish_api", params)
    listeners = max(args.batch, args.batch_size if args.side_by_side else 0) + max(args.sockets, 1)
    try:
        users = common.prepare_project_database(db, listeners) if db else common.baseline_users(listeners)
        for index in range(args.runs):
            log(f"run {index + 1}/{args.runs}: {params}")
            if args.side_by_side:
                assert db is not None
                run = run_side_by_side(args, db.url, users, common.baseline_users(args.sockets))
                print("\n" + side_table(run["variants"]) + "\n")
                for name, m in run["variants"].items():
                    report.violations += _violations(f"run {index + 1} {name}", m)
                run["metrics"] = {
                    f"{k}:{name}": v for name, m in run["variants"].items() for k, v in m.items()
                }
            else:
                run = run_publish(args, db.url if db else None, users)
                report.violations += _violations(f"run {index + 1}", run["metrics"])
            report.runs.append(run)
    finally:
        if db is not None:
            db.drop()
    return common.emit(report, LABELS if not args.side_by_side else {}, args.json, args.json_out)


def _violations(where: str, metrics: dict[str, Any]) -> list[str]:
    found = []
    if metrics.get("failed"):
        found.append(f"{where}: {metrics['failed']} requests not accepted")
    for key in ("lost", "duplicates", "out_of_order"):
        if metrics.get(key):
            found.append(f"{where}: {key.upper()} = {metrics[key]} (of {metrics['expected']})")
    return found


if __name__ == "__main__":
    sys.exit(main())
