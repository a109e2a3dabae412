"""Who may subscribe to which topic."""

import re
from typing import TypeGuard

from django.contrib.auth.models import AnonymousUser, User

from notifications.models import Topic

TOPIC_MAX_LENGTH = 200
TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9_.:/@-]{1,200}$")
TOPIC_RULE = "1-200 characters of letters, digits and _ . : / @ -"


def is_valid_topic_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and bool(TOPIC_PATTERN.match(name))


def can_subscribe(user: User | AnonymousUser, topic: str) -> bool:
    """Open to every signed-in user, unless an admin gave the topic groups: then members and staff."""
    if not user.is_authenticated or not user.is_active:
        return False
    restriction = Topic.objects.filter(name=topic).first()
    if restriction is None:
        return True
    group_ids = list(restriction.groups.values_list("id", flat=True))
    if not group_ids or user.is_staff or user.is_superuser:
        return True
    return user.groups.filter(id__in=group_ids).exists()
