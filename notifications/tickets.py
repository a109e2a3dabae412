"""Short-lived signed tickets that let a non-browser client open a socket (`/ws/?ticket=`).

The API issues them and the socket's handshake checks them: both sides import this module.
"""

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core import signing

logger = logging.getLogger(__name__)

TICKET_SALT = "realtime.ws-ticket"


def issue_ticket(user: AbstractBaseUser) -> str:
    """A signed, timestamped ticket naming the user; valid for RT_TICKET_TTL seconds."""
    return signing.dumps({"u": user.pk}, salt=TICKET_SALT, compress=False)


def user_for_ticket(ticket: str) -> AbstractBaseUser | None:
    """The active user a valid, unexpired ticket names, else None."""
    try:
        data = signing.loads(ticket, salt=TICKET_SALT, max_age=settings.RT_TICKET_TTL)
    except signing.SignatureExpired:
        logger.info("refused an expired socket ticket")
        return None
    except signing.BadSignature:
        logger.info("refused a forged socket ticket")
        return None
    if not isinstance(data, dict) or "u" not in data:
        return None
    return get_user_model().objects.filter(pk=data["u"], is_active=True).first()
