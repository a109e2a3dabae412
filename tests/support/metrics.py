"""Reading a process's Prometheus text and probes, for black-box tests."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, instance: str) -> float:
    """The value of sample `name` labelled `instance` in Prometheus text; KeyError if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("instance") == instance:
                return sample.value
    raise KeyError(name)


async def is_ready(http: httpx.AsyncClient, web) -> bool:
    """Whether a web instance's `/readyz` says 200 (False while it does not answer)."""
    try:
        return (await http.get(f"{web.url}/readyz")).status_code == 200
    except httpx.TransportError:
        return False
