"""Prometheus metrics of this process (each web instance and worker exposes its own)."""

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

INSTANCE = settings.RT_INSTANCE_ID

connections = Gauge("rt_connections", "Open WebSocket connections on this instance", ["instance"]).labels(
    INSTANCE
)
broker_connected = Gauge(
    "rt_broker_connected", "1 while this process is connected to RabbitMQ", ["instance"]
).labels(INSTANCE)
messages_received = Counter(
    "rt_broker_messages_received", "Messages this instance took from its broadcast queue", ["instance"]
).labels(INSTANCE)
messages_duplicate = Counter(
    "rt_broker_messages_duplicate", "Redelivered messages skipped as already delivered", ["instance"]
).labels(INSTANCE)
deliveries = Counter("rt_deliveries", "Messages handed to a socket", ["instance"]).labels(INSTANCE)
delivery_failures = Counter(
    "rt_delivery_failures", "Messages a socket could not take (closed or too slow)", ["instance"]
).labels(INSTANCE)
messages_published = Counter(
    "rt_messages_published", "Messages confirmed by the broker", ["instance"]
).labels(INSTANCE)
publish_failures = Counter(
    "rt_publish_failures", "Publishes the broker did not confirm", ["instance"]
).labels(INSTANCE)
publish_latency = Histogram(
    "rt_publish_latency_seconds",
    "Time from publish to broker confirm",
    ["instance"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
).labels(INSTANCE)
inbound_queued = Counter(
    "rt_inbound_queued", "Inbound frames confirmed onto the work queue", ["instance"]
).labels(INSTANCE)
inbound_processed = Counter(
    "rt_inbound_processed", "Inbound frames processed by this worker", ["instance"]
).labels(INSTANCE)
inbound_failed = Counter(
    "rt_inbound_failed", "Inbound frame attempts whose handler raised", ["instance"]
).labels(INSTANCE)
inbound_dead = Counter("rt_inbound_dead", "Inbound frames dead-lettered", ["instance"]).labels(INSTANCE)
delivery_log_rows = Counter("rt_delivery_log_rows", "Delivery log rows written", ["instance"]).labels(
    INSTANCE
)
slow_readers_closed = Counter(
    "rt_slow_readers_closed", "Sockets closed because their client stopped reading", ["instance"]
).labels(INSTANCE)
