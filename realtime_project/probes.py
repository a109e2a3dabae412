"""Answer `/healthz` and `/readyz` before Django's host check.

Balancers and container runtimes probe by IP address or `localhost`, which need not be in
DJANGO_ALLOWED_HOSTS; these two answers reveal nothing, so they skip the check.
"""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from realtime_project import health

PROBES = {"/healthz": health.healthz, "/readyz": health.readyz}


class ProbeMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    async def __call__(self, request):
        probe = PROBES.get(request.path)
        if probe is not None and request.method in ("GET", "HEAD"):
            return await probe(request)
        return await self.get_response(request)
