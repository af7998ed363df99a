"""Prometheus metrics at /metrics: what the appliance served, refused and waited for, with the
model servers' own metrics (llama-server's `llamacpp:*`) fetched and re-exported in the same
scrape, labelled with their backend, so one scrape target covers both.

Labels stay few: route, status class, model, credential kind; never a user or key unless the
operator opts in (metrics_per_principal). With --workers every process writes its numbers to
files in one directory (prometheus-client's multiprocess mode, chosen before the library is
imported: proxy/__main__.py) and whichever process answers a scrape adds them all up.

The /metrics route, its access rule and the fetching of the model servers' metrics are
proxy/api/scrape.py's.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from importlib import metadata

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.outcome import Outcome, on_finished
from proxy.upstream.backends import Backend, State

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 1 ms to 60 s: the relay's own cost at the bottom, a long generation at the top.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
           30.0, 60.0)
MODEL_STATES = ("loaded", "loading", "unloaded", "failed")
STATES = tuple(state.value for state in State)


class Metrics:
    """Every series the appliance exports, and the calls that feed them."""

    def __init__(self, per_principal: bool = False) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=False)
        r, p = self.registry, "llama_proxy_"
        self.requests = Counter(p + "requests", "Requests answered, by route, status class, "
                                "model and credential kind",
                                ["route", "status", "model", "credential"], registry=r)
        self.duration = Histogram(p + "request_duration_seconds", "Time from the request's "
                                  "arrival to the end of its answer", ["route"],
                                  buckets=BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from a streamed "
                              "request's arrival to its first chunk from the model",
                              ["route", "model"], buckets=BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens the model servers reported (prompt or "
                              "completion)", ["model", "type"], registry=r)
        self.open_streams = Gauge(p + "open_streams", "Event streams open to clients now "
                                  "(waiting for a slot or a first token, or being sent)",
                                  registry=r, multiprocess_mode="livesum")
        self.disconnects = Counter(p + "client_disconnects", "Requests that ended because the"
                                   " client left (gone: it closed or reset the connection) or "
                                   "stopped reading a stream (write_timeout)",
                                   ["reason"], registry=r)
        self.queue_waiting = Gauge(p + "queue_waiting", "Requests waiting for a model slot",
                                   ["model"], registry=r, multiprocess_mode="livemax")
        self.slots_busy = Gauge(p + "slots_busy", "Model slots in use", ["model"], registry=r,
                                multiprocess_mode="livemax")
        self.slots = Gauge(p + "slots", "Model slots (admission_slots, or the model's "
                           "parallel)", ["model"], registry=r, multiprocess_mode="livemax")
        self.queue_max = Gauge(p + "queue_max", "Requests that may wait for a slot "
                               "(queue_max)", ["model"], registry=r, multiprocess_mode="livemax")
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Time waited for a model slot "
                                    "(and for the model to start)", ["model"], buckets=BUCKETS,
                                    registry=r)
        self.model_state = Gauge(p + "model_state", "1 for the state each catalog model is in",
                                 ["model", "state"], registry=r, multiprocess_mode="livemax")
        self.model_loads = Counter(p + "model_loads", "Starts of a catalog model that came up",
                                   ["model"], registry=r)
        self.model_load_seconds = Counter(p + "model_load_seconds", "Seconds catalog models "
                                          "took to come up, in all", ["model"], registry=r)
        self.model_evictions = Counter(p + "model_evictions", "Catalog models stopped, by "
                                       "reason (idle, room, unload)", ["model", "reason"],
                                       registry=r)
        self.model_swap_waits = Counter(p + "model_swap_waits", "Requests that waited for "
                                        "their model to start", ["model"], registry=r)
        self.model_memory = Gauge(p + "model_memory_mib", "Memory a catalog model is counted "
                                  "for (estimated) and takes (measured, while it runs)",
                                  ["model", "kind"], registry=r, multiprocess_mode="livemax")
        self.queue_refusals = Counter(p + "queue_refusals", "Requests refused by the slot "
                                      "queue (full, timeout, closed)", ["reason", "model"],
                                      registry=r)
        self.rate_limited = Counter(p + "rate_limited", "Requests refused by a rate-limit "
                                    "window (rpm, rpd, tpm, concurrency, ip_rpm)", ["window"],
                                    registry=r)
        self.auth_failures = Counter(p + "auth_failures", "Refused credentials, by reason",
                                     ["reason"], registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Model server failures: "
                                       "unreachable, timeout, broken", ["backend", "kind"],
                                       registry=r)
        self.child_restarts = Counter(p + "child_restarts", "Restarts of a supervised child "
                                      "after it ended", ["child"], registry=r)
        self.backend_state = Gauge(p + "backend_state", "1 for the state each backend is in",
                                   ["backend", "state"], registry=r,
                                   multiprocess_mode="livemax")
        self.redis_degraded = Gauge(p + "redis_degraded", "1 while Redis is unreachable and "
                                    "limits are kept in process", registry=r,
                                    multiprocess_mode="livemax")
        self.limit_round_trips = Counter(p + "limit_round_trips", "Round trips to Redis by "
                                         "the rate limiter (checks and settlements, batched)",
                                         registry=r)
        self.upstream_scrape_errors = Counter(p + "upstream_scrape_errors", "Failed fetches "
                                              "of a model server's /metrics", ["backend"],
                                              registry=r)
        self.build = Gauge(p + "build_info", "The appliance's version", ["version", "python"],
                           registry=r, multiprocess_mode="livemax")
        self.build.labels(_version(), sys.version.split()[0]).set(1)
        self.per_principal = per_principal
        if per_principal:
            self.principal_requests = Counter(p + "principal_requests", "Model requests per "
                                              "principal (opt-in)", ["principal"], registry=r)
            self.principal_tokens = Counter(p + "principal_tokens", "Tokens per principal "
                                            "(opt-in)", ["principal", "type"], registry=r)

    # -- fed by the request path --------------------------------------------------------------
    def finished(self, request: web.Request, outcome: Outcome) -> None:
        """Observer of every finished request (proxy/observe/outcome.py)."""
        route = route_of(request)
        model = outcome.model or ""
        self.requests.labels(route, status_class(outcome.status), model,
                             outcome.credential).inc()
        self.duration.labels(route).observe(outcome.duration)
        if outcome.first_token is not None:
            self.ttft.labels(route, model).observe(outcome.first_token)
        if outcome.queue_wait is not None:
            self.queue_wait.labels(model).observe(outcome.queue_wait)
        if outcome.limit not in ("", "ok", "local"):
            self.rate_limited.labels(outcome.limit).inc()
        if outcome.auth_failure:
            self.auth_failures.labels(outcome.auth_failure).inc()
        if outcome.queue_refused:
            self.queue_refusals.labels(outcome.queue_refused, model).inc()
        for backend, kind in outcome.upstream_errors:
            self.upstream_errors.labels(backend, kind).inc()
        if outcome.disconnect:
            self.disconnects.labels(outcome.disconnect).inc()
        if outcome.metered:
            self.tokens.labels(model, "prompt").inc(outcome.prompt_tokens or 0)
            self.tokens.labels(model, "completion").inc(outcome.completion_tokens or 0)
            if self.per_principal:
                self.principal_requests.labels(outcome.principal).inc()
                self.principal_tokens.labels(outcome.principal, "prompt").inc(
                    outcome.prompt_tokens or 0)
                self.principal_tokens.labels(outcome.principal, "completion").inc(
                    outcome.completion_tokens or 0)

    def backends(self, backends: Iterable[Backend]) -> None:
        for backend in backends:
            for state in STATES:
                self.backend_state.labels(backend.name, state).set(
                    1 if backend.state.value == state else 0)

    def queue(self, model: str, stats: dict[str, object]) -> None:
        slots, free, waiting, most = (_int(stats.get(k)) for k in (
            "slots", "free", "waiting", "max_waiting"))
        self.slots.labels(model).set(slots)
        self.queue_max.labels(model).set(most)
        self.slots_busy.labels(model).set(max(slots - free, 0))
        self.queue_waiting.labels(model).set(waiting)

    def model(self, model: str, state: str, estimated: int, measured: int | None) -> None:
        for each in MODEL_STATES:
            self.model_state.labels(model, each).set(1 if each == state else 0)
        self.model_memory.labels(model, "estimated").set(estimated)
        self.model_memory.labels(model, "measured").set(measured or 0)

    # -- a scrape ------------------------------------------------------------------------------
    def render(self, fetched: list[Metric]) -> bytes:
        registry = self.registry
        if self.multiprocess:
            registry = CollectorRegistry(auto_describe=False)
            multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
        if fetched:
            extra = CollectorRegistry(auto_describe=False)
            extra.register(_Fetched(fetched))
            text += generate_latest(extra)
        return text


class _Fetched:
    """The model servers' metric families, as fetched for this scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _version() -> str:
    try:
        return metadata.version("llama-proxy")
    except metadata.PackageNotFoundError:
        return "source"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def route_of(request: web.Request) -> str:
    """The route's pattern (/v1/chat/completions, /api/conversations/{id}): never the raw path,
    which a scanner could make unbounded."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


_COUNTER_WITHOUT_TOTAL = re.compile(r"^# TYPE (\S+(?<!_total)) counter$", re.MULTILINE)


def relabel(text: str, backend: Backend) -> list[Metric]:
    """A model server's exposition, every sample labelled with its backend (and model)."""
    families = []
    extra = {"backend": backend.name}
    if backend.models:
        extra["model"] = backend.models[0]
    # A counter named without _total (llamacpp:n_tokens_max) would come out renamed with one;
    # passed on untyped, it keeps the name llama-server gives it.
    text = _COUNTER_WITHOUT_TOTAL.sub(r"# TYPE \1 untyped", text)
    for family in text_string_to_metric_families(text):
        metric = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            labels = {**extra, **sample.labels}
            metric.add_sample(sample.name, labels, sample.value, sample.timestamp,
                              sample.exemplar)
        families.append(metric)
    return families


def forget_process(pid: int) -> None:
    """With --workers: a process that ended no longer adds to the gauges of the moment."""
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.mark_process_dead(pid)


METRICS = web.AppKey("metrics", Metrics)


def setup_metrics(app: web.Application, metrics: Metrics) -> None:
    """Call early (before the features that feed it): app[METRICS], its observer of every
    finished request, and the open-streams gauge. The /metrics route is proxy/api/scrape.py's."""
    app[METRICS] = metrics
    on_finished(app, _stream_closed)
    on_finished(app, metrics.finished)
    app.on_response_prepare.append(_stream_opened)


_STREAMING = web.RequestKey("metrics_streaming", bool)


async def _stream_opened(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: an event stream is starting (/v1 streams, /api/chat)."""
    if response.content_type == "text/event-stream":
        request[_STREAMING] = True
        request.app[METRICS].open_streams.inc()


def _stream_closed(request: web.Request, outcome: Outcome) -> None:
    if request.get(_STREAMING):
        request[_STREAMING] = False
        request.app[METRICS].open_streams.dec()
