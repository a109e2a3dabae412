"""What the contract says a message record holds (CONTRACT §3, with `stream` and `seq` of §4)."""

MESSAGE_RECORD_FIELDS = frozenset(
    {
        "id",
        "topic",
        "user",
        "broadcast",
        "event",
        "payload",
        "status",
        "created_at",
        "published_at",
        "deliveries",
        "stream",
        "seq",
    }
)
