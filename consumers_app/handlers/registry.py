"""Inbound event name -> handler, from settings.RT_INBOUND_HANDLERS (dotted paths)."""

from functools import cache

from django.conf import settings
from django.utils.module_loading import import_string

from consumers_app.handlers.base import InboundHandler


@cache
def _handlers() -> dict[str, InboundHandler]:
    loaded = {}
    for event, path in settings.RT_INBOUND_HANDLERS.items():
        target = import_string(path)
        loaded[event] = target() if isinstance(target, type) else target
    return loaded


def get_handler(event: str) -> InboundHandler | None:
    return _handlers().get(event)


def reset() -> None:
    """Forget loaded handlers (settings changed, in tests)."""
    _handlers.cache_clear()
