"""Records in tests: what the contract says a message record holds (CONTRACT §3, with `stream`
and `seq` of §4), and a user's row removed the way a concurrent deletion can leave it."""

from django.contrib.auth.models import User
from django.db import connection

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


def remove_user_row(username: str) -> None:
    """Delete the user's row under Django's nose, as a deletion racing a publish can leave the
    links the database does not check (README, "Decisions"): those rows still name the user."""
    user_id = User.objects.get(username=username).pk
    with connection.cursor() as cursor:
        for table in ("authtoken_token", "auth_user_groups", "auth_user_user_permissions", "auth_user"):
            column = "id" if table == "auth_user" else "user_id"
            cursor.execute(f"DELETE FROM {table} WHERE {column} = %s", [user_id])
