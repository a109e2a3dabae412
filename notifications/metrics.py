"""Prometheus metrics of this process (each web instance and worker exposes its own)."""

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

INSTANCE = settings.RT_INSTANCE_ID


def _counter(name: str, documentation: str):
    return Counter(name, documentation, ["instance"]).labels(INSTANCE)


def _gauge(name: str, documentation: str):
    return Gauge(name, documentation, ["instance"]).labels(INSTANCE)


connections = _gauge("rt_connections", "Open WebSocket connections on this instance")
broker_connected = _gauge("rt_broker_connected", "1 while this process is connected to RabbitMQ")
messages_received = _counter(
    "rt_messages_received",
    "Messages this instance took from the broker (one per message, also when several travel together)",
)
messages_duplicate = _counter(
    "rt_broker_messages_duplicate", "Redelivered messages skipped as already delivered"
)
messages_malformed = _counter(
    "rt_broker_messages_malformed", "Messages (or items of one) taken from the broker that could not be read"
)
stream_reads = _counter(
    "rt_stream_reads", "Database reads of stream positions and history (shared by the sockets that asked)"
)
stream_gaps_filled = _counter(
    "rt_stream_gaps_filled", "Messages a web instance read from the database to fill a gap"
)
presence_members = _gauge("rt_presence_members", "(topic, user) pairs with a socket on this instance")
lease_renewals = _counter("rt_lease_renewals", "Renewals of this instance's lease")
lease_expiries = _counter("rt_lease_expiries", "Lapsed leases of other instances this one removed")
bindings = _gauge("rt_bindings", "Routing keys (topics, users) this instance's queue is bound to")
deliveries = _counter("rt_deliveries", "Messages handed to a socket")
delivery_failures = _counter("rt_delivery_failures", "Messages a socket could not take (closed or too slow)")
slow_readers_closed = _counter(
    "rt_slow_readers_closed", "Sockets closed because their client stopped reading"
)
messages_published = _counter("rt_messages_published", "Messages confirmed by the broker")
publish_failures = _counter("rt_publish_failures", "Publishes the broker did not confirm")
publish_latency = Histogram(
    "rt_publish_latency_seconds",
    "Time from publish to broker confirm",
    ["instance"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
).labels(INSTANCE)
messages_swept = _counter("rt_messages_swept", "Unconfirmed messages published by the sweeper")
inbound_swept = _counter("rt_inbound_swept", "Unqueued inbound frames queued by the sweeper")
inbound_queued = _counter("rt_inbound_queued", "Inbound frames confirmed onto the work queue")
inbound_processed = _counter("rt_inbound_processed", "Inbound frames processed by this worker")
inbound_failed = _counter("rt_inbound_failed", "Inbound frame attempts whose handler raised")
inbound_dead = _counter("rt_inbound_dead", "Inbound frames dead-lettered")
delivery_log_dropped = _counter(
    "rt_delivery_log_dropped", "Delivery log rows dropped because the database could not keep up"
)
delivery_log_rows = _counter("rt_delivery_log_rows", "Delivery log rows written")
