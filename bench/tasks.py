"""The benchmarks' database work, run in a subprocess with a deployment's environment.

    python -m bench.tasks users SPEC_JSON   the publisher and the listeners, with API tokens
    python -m bench.tasks frames IDS_FILE   who processed those inbound frames, and their statuses

Each prints its answer as JSON on the last line of stdout (logs go to stderr). The orchestrating
process never imports Django: bench/common.py runs these as `python -m`, as it runs `migrate`.
"""

import json
import sys
from pathlib import Path
from typing import Any

# Ids per query: an IN list of 10,000 UUIDs is slow to plan.
CHUNK = 1000


def create_users(spec: dict[str, Any]) -> dict[str, Any]:
    """The publisher (notifications.add_message) and `listeners` users named `<prefix><n>`, each
    with a token: {"publisher": token, "listeners": [[name, token], ...]}."""
    from django.contrib.auth.models import Permission, User
    from rest_framework.authtoken.models import Token

    names = [spec["publisher"]] + [f"{spec['prefix']}{i}" for i in range(spec["listeners"])]
    User.objects.bulk_create([User(username=n, password="!") for n in names], batch_size=500)
    users = {u.username: u for u in User.objects.filter(username__in=names)}
    users[spec["publisher"]].user_permissions.add(Permission.objects.get(codename="add_message"))
    Token.objects.bulk_create([Token(key=Token.generate_key(), user=users[n]) for n in names], batch_size=500)
    keys = dict(Token.objects.filter(user__username__in=names).values_list("user__username", "key"))
    return {"publisher": keys[spec["publisher"]], "listeners": [[n, keys[n]] for n in names[1:]]}


def frame_records(ids: list[str]) -> dict[str, dict[str, int]]:
    """How many of these inbound frames each worker processed, and how many have each status."""
    from django.db.models import Count

    from notifications.models import InboundFrame

    by_worker: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for start in range(0, len(ids), CHUNK):
        frames = InboundFrame.objects.filter(id__in=ids[start : start + CHUNK])
        for field, counts in (("processed_by", by_worker), ("status", by_status)):
            for row in frames.values(field).annotate(n=Count("id")):
                counts[row[field]] = counts.get(row[field], 0) + row["n"]
    return {"by_worker": by_worker, "by_status": by_status}


def main(argv: list[str]) -> None:
    import django

    django.setup()
    task, arg = argv
    if task == "users":
        answer = create_users(json.loads(arg))
    elif task == "frames":
        answer = frame_records(json.loads(Path(arg).read_text()))
    else:
        raise SystemExit(f"unknown task {task!r}")
    print(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1:])
