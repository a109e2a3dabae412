"""The admin's overview, `/admin/overview/` (CONTRACT §3, staff only): the deployment at a glance.

The page is rendered whole on the server; its script (static/notifications/overview.js) fetches
`/admin/overview/parts/` every few seconds and swaps the parts that changed, so it refreshes
without a reload and keeps showing the last good state while a refresh fails. Requeueing a dead
frame goes through the same service as the admin's "requeue" action, with the same permission.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from notifications import overview
from notifications.broker import current_topology
from notifications.models import InboundFrame
from notifications.services.requeue import requeue_dead_frames

# Milliseconds between two refreshes of an open page.
REFRESH_MS = 3000
# The page's parts, in the order they show: each has its template and its element.
PARTS = ("summary", "processes", "queues", "rates", "dead")
# Size of a rate chart (SVG user units); one bar per minute.
CHART_WIDTH = 360
CHART_HEIGHT = 72
# Characters of a dead frame's error shown in the table (all of it in the tooltip and the admin).
ERROR_SHOWN = 240


def install(site: AdminSite) -> None:
    """Add the overview's URLs to `site`, ahead of the admin's own (whose `<app_label>/`
    pattern would otherwise take `overview/`)."""
    own_urls = site.get_urls

    def get_urls() -> list[URLPattern | URLResolver]:
        return [
            path("overview/", site.admin_view(_bound(page, site)), name="overview"),
            path("overview/parts/", staff_json(site, _bound(parts, site)), name="overview_parts"),
            path("overview/requeue/", site.admin_view(_bound(requeue, site)), name="overview_requeue"),
            *own_urls(),
        ]

    site.get_urls = get_urls  # type: ignore[method-assign]


def _bound(view: Callable[..., HttpResponse], site: AdminSite) -> Callable[[HttpRequest], HttpResponse]:
    def bound(request: HttpRequest) -> HttpResponse:
        return view(request, site)

    bound.__name__ = view.__name__
    bound.__doc__ = view.__doc__
    return bound


def staff_json(site: AdminSite, view: Callable[[HttpRequest], HttpResponse]) -> Callable[..., HttpResponse]:
    """Like `site.admin_view`, for the page's script: 403 JSON instead of a redirect to the
    sign-in page (which the script could not follow), never cached."""

    @never_cache
    def guarded(request: HttpRequest) -> HttpResponse:
        if not site.has_permission(request):
            return JsonResponse({"detail": "Staff only: sign in to the admin again."}, status=403)
        return view(request)

    return guarded


# --- views ---------------------------------------------------------------------------------


def page(request: HttpRequest, site: AdminSite) -> HttpResponse:
    context = site.each_context(request) | {
        "title": "Overview",
        "subtitle": None,
        "refresh_ms": REFRESH_MS,
        "parts_url": reverse(f"{site.name}:overview_parts"),
    }
    context |= part_context(request, site, overview.snapshot())
    return TemplateResponse(request, "notifications/overview.html", context)


def parts(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """The page's parts as HTML (what the script swaps in) and as data (for scripts of one's own)."""
    snapshot = overview.snapshot()
    context = part_context(request, site, snapshot)
    return JsonResponse(
        {
            "generated_at": snapshot.generated_at.isoformat(),
            "parts": {
                name: render_to_string(f"notifications/overview_{name}.html", context, request)
                for name in PARTS
            },
            "data": data(snapshot),
        }
    )


@require_POST
def requeue(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """Requeue the dead frames posted (`frame`, repeated), as the admin's action does."""
    if not may_requeue(request, site):
        raise PermissionDenied("requeueing needs the permission to change inbound frames")
    ids = []
    for value in request.POST.getlist("frame"):
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            continue
    outcome = requeue_dead_frames(ids)
    if outcome.requeued:
        messages.success(request, f"Requeued {outcome.requeued} dead frame(s).")
    elif not outcome.error:
        messages.warning(request, "Nothing requeued: those frames are not dead any more.")
    if outcome.error:
        messages.error(request, f"Stopped requeueing: {outcome.error}")
    return HttpResponseRedirect(reverse(f"{site.name}:overview") + "#dead")


def may_requeue(request: HttpRequest, site: AdminSite) -> bool:
    """The inbound frame admin's own rule for its "requeue" action (the change permission)."""
    model_admin = site._registry.get(InboundFrame)
    check = getattr(model_admin, "has_requeue_permission", None)
    return bool(check and check(request))


# --- what the templates show ---------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    minute: str
    count: int


@dataclass(frozen=True)
class Chart:
    name: str
    label: str
    total: int
    current: int
    last: int
    peak: int
    bars: list[Bar]
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT


def chart(series: overview.Series) -> Chart:
    """Bars of a series, scaled to its peak (an empty hour draws no bar)."""
    slot = CHART_WIDTH / max(len(series.counts), 1)
    peak = series.peak
    bars = []
    for index, (minute, count) in enumerate(zip(series.minutes, series.counts, strict=True)):
        height = round(count / peak * (CHART_HEIGHT - 2), 2) if peak else 0.0
        if count and height < 1:
            height = 1.0
        bars.append(
            Bar(
                x=round(index * slot + 0.5, 2),
                y=round(CHART_HEIGHT - height, 2),
                width=round(max(slot - 1, 1), 2),
                height=height,
                minute=minute.strftime("%H:%M"),
                count=count,
            )
        )
    current = series.counts[-1] if series.counts else 0
    return Chart(series.name, series.label, series.total, current, series.last, peak, bars)


def ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def process_rows(procs: list[overview.Process], backlog: dict[str, int | None]) -> list[dict[str, Any]]:
    return [
        {
            "process": proc,
            "renewed": ago(proc.renewed_ago),
            "backlog": backlog.get(proc.instance),
        }
        for proc in procs
    ]


def part_context(request: HttpRequest, site: AdminSite, snapshot: overview.Snapshot) -> dict[str, Any]:
    depths = snapshot.depths
    instance_queues = {q.name: q.messages for q in depths.queues if q.role == "instance"}
    topology = current_topology()
    backlog = {
        proc.instance: instance_queues.get(topology.instance_queue(proc.instance)) for proc in snapshot.webs
    }
    by_role = {q.role: q for q in depths.queues if q.role in ("inbound", "dead")}
    live_webs = [p for p in snapshot.webs if p.state != "gone"]
    live_workers = [p for p in snapshot.workers if p.state != "gone"]
    dead_frames = snapshot.dead.value or []
    return {
        "snapshot": snapshot,
        "generated_at": snapshot.generated_at,
        "webs": process_rows(snapshot.webs, backlog),
        "workers": process_rows(snapshot.workers, {}),
        "processes_error": snapshot.processes.error,
        "summary": {
            "webs_up": len(live_webs),
            "workers_up": len(live_workers),
            "sockets": sum(_number(p.stats.get("sockets")) for p in live_webs),
            "lanes": sum(_number(p.stats.get("lanes")) for p in live_workers),
            "inbound": by_role["inbound"].messages if "inbound" in by_role else None,
            "dead_queue": by_role["dead"].messages if "dead" in by_role else None,
            "dead_frames": snapshot.dead_total.value,
        },
        "depths": depths,
        "queues": [q for q in depths.queues if q.role != "instance"],
        "charts": [chart(series) for series in snapshot.rates.value or []],
        "rates_error": snapshot.rates.error,
        "dead_frames": [
            {
                "frame": frame,
                "error": frame.error[:ERROR_SHOWN] + ("…" if len(frame.error) > ERROR_SHOWN else ""),
                "url": reverse(f"{site.name}:notifications_inboundframe_change", args=[frame.pk]),
            }
            for frame in dead_frames
        ],
        "dead_error": snapshot.dead.error or snapshot.dead_total.error,
        "dead_total": snapshot.dead_total.value,
        "dead_list_url": reverse(f"{site.name}:notifications_inboundframe_changelist")
        + "?status__exact=dead",
        "can_requeue": may_requeue(request, site),
        "requeue_url": reverse(f"{site.name}:overview_requeue"),
    }


def _number(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def data(snapshot: overview.Snapshot) -> dict[str, Any]:
    return {
        "processes": [p.as_dict() for p in snapshot.processes.value or []],
        "processes_error": snapshot.processes.error,
        "broker": snapshot.depths.as_dict(),
        "rates": [series.as_dict() for series in snapshot.rates.value or []],
        "rates_error": snapshot.rates.error,
        "dead_frames": [
            {"id": str(frame.pk), "event": frame.event, "error": frame.error, "attempts": frame.attempts}
            for frame in snapshot.dead.value or []
        ],
        "dead_total": snapshot.dead_total.value,
    }
