"""Liveness, readiness and metrics endpoints for balancers and Prometheus."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumers_app import lifecycle
from consumers_app.bridge import ensure_bridge


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the process lives."""
    return JsonResponse({"status": "ok"})


async def readyz(request: HttpRequest) -> JsonResponse:
    """200 once connected to RabbitMQ; 503 before, during an outage, and while draining."""
    bridge = ensure_bridge()
    if lifecycle.draining:
        return not_ready("draining", bridge.instance_id)
    if not bridge.ready:
        return not_ready("waiting for RabbitMQ", bridge.instance_id)
    return JsonResponse({"status": "ready", "instance": bridge.instance_id})


def not_ready(why: str, instance: str) -> JsonResponse:
    response = JsonResponse({"status": why, "instance": instance}, status=503)
    # An expected answer, polled every few seconds: not an error for django.request to log.
    response._has_been_logged = True  # type: ignore[attr-defined]  # Django's private flag, not in the stubs
    return response


def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
