"""Reading a broker's ``/metrics`` the way Prometheus does: over HTTP, parsed by
prometheus-client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)


def get(address: str, path: str, *, timeout: float = 10.0) -> tuple[int, str, str]:
    """``GET http://address/path``: status, content type, body (errors included)."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def scrape(address: str) -> Samples:
    status, _, text = get(address, "/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {have[label]: v for have, v in samples.get(name, [])}


def tasks_total(samples: Samples) -> dict[tuple[str, str, int], int]:
    """``pbt_tasks_total`` as {(outcome, code, codeunit): count}, zeros left out."""
    return {
        (labels["outcome"], labels["code"], int(labels["codeunit"])): int(v)
        for labels, v in samples.get("pbt_tasks_total", [])
        if v
    }


def of_codeunit(
    tasks: Mapping[tuple[str, str, int], int], codeunit: int
) -> dict[tuple[str, str], int]:
    return {(o, c): n for (o, c, cu), n in tasks.items() if cu == codeunit}
