"""Reading the appliance's /metrics in tests: one scrape, parsed."""

from __future__ import annotations

import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import Running


class Scrape:
    """One scrape, parsed: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        families = list(text_string_to_metric_families(text))
        self.families = {family.name for family in families}
        self.samples = [s for family in families for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none, but the
        metric itself must exist: a renamed one is an error, not a zero)."""
        family = re.sub(r"_(total|count|sum|bucket|created)$", "", name)
        assert name in self.families or family in self.families, f"no metric {name}"
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(proxy: Running, headers: dict[str, str] | None = None) -> Scrape:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/metrics", headers=headers or {}) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return Scrape(text)
