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
        return JsonResponse({"status": "draining", "instance": bridge.instance_id}, status=503)
    if not bridge.ready:
        return JsonResponse({"status": "waiting for RabbitMQ", "instance": bridge.instance_id}, status=503)
    return JsonResponse({"status": "ready", "instance": bridge.instance_id})


def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
