"""Create (or update) a demo superuser for a local run, and print its API token.

    RT_DEMO_USER=demo [RT_DEMO_PASSWORD=...] python deploy/demo_user.py

A superuser may sign in at /accounts/login/ and /admin/, and publish with its token. Without
RT_DEMO_PASSWORD a new user gets a random password, printed once; an existing user keeps its own.
"""

import os
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")


def main() -> int:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    username = os.environ.get("RT_DEMO_USER", "").strip()
    if not username:
        print("RT_DEMO_USER is not set: no demo user", file=sys.stderr)
        return 1
    password = os.environ.get("RT_DEMO_PASSWORD", "")
    user, created = get_user_model().objects.get_or_create(
        username=username, defaults={"is_staff": True, "is_superuser": True}
    )
    if password:
        shown = "from RT_DEMO_PASSWORD"
    elif created:
        password = shown = secrets.token_urlsafe(12)
    else:
        shown = "unchanged (set RT_DEMO_PASSWORD to change it)"
    if password:
        user.set_password(password)
        user.save()
    token, _ = Token.objects.get_or_create(user=user)
    print(
        f"demo user {username!r} {'created' if created else 'exists'}: password {shown}, API token {token.key}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
