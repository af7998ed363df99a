"""docker/monitoring/: Prometheus's configuration and alert rules pass promtool (and the rules'
own unit tests, which fail when a rule is broken), Alertmanager's passes amtool, the Grafana
dashboard is well formed and has the panels the docs promise, and every metric the dashboard and
the rules query is one the appliance really exports: one scrape of an appliance supervising the
real llama-server, after served and refused traffic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.server import Running
from tests.conftest import ProxyFactory, token_for
from tests.kit.helpers import REPO, eventually

MONITORING = REPO / "docker" / "monitoring"
PROMETHEUS = MONITORING / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
ALERTMANAGER = MONITORING / "alertmanager.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llama-proxy.json"
TOKEN_FILE = "/etc/prometheus/metrics_token"

# The dashboard's panels, as docs/monitoring.md lists them: a title containing each of these.
PANELS = ["request rate", "error rate", "latency p50 / p95 / p99", "time to first token p50",
          "tokens/s (prompt and completion)", "queue depth", "queue wait", "429s by window",
          "auth failures by reason", "child restarts", "backend state", "redis degraded",
          "open streams"]
ALERT_NAMES = {"LlamaProxyDown", "LlamaProxyBackendNotReady", "LlamaProxyChildRestarting",
               "LlamaProxyHighErrorRatio", "LlamaProxyUpstreamErrors", "LlamaProxySlowFirstToken",
               "LlamaProxyQueueSaturated", "LlamaProxyQueueRefusing", "LlamaProxyRedisDegraded",
               "LlamaProxyAuthFailureSpike"}


BIN = Path(sys.executable).parent  # make install unpacks promtool and amtool here


def tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def promtool() -> str:
    path = tool("promtool")
    if path is None:
        pytest.fail("promtool is missing: make check-tools (part of make install)")
    return path


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


# -- Prometheus and Alertmanager ---------------------------------------------------------------

def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    result = run(promtool(), "check", "config", "--syntax-only", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr
    # The full check also reads the rule files and the token file: give it a token where the
    # compose file mounts one (here, in a copy of the directory).
    text = PROMETHEUS.read_text()
    assert text.count(TOKEN_FILE) == 1
    (tmp_path / "metrics_token").write_text("x" * 64)
    (tmp_path / "prometheus.yml").write_text(text.replace(TOKEN_FILE,
                                                          str(tmp_path / "metrics_token")))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    result = run(promtool(), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout  # the rules came along


def test_the_prometheus_config_scrapes_the_appliance_and_alerts_alertmanager() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "llama-proxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["llama-proxy:8000"]}]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": TOKEN_FILE}
    assert config["rule_files"] == [ALERTS.name]
    [manager] = config["alerting"]["alertmanagers"]
    assert manager["static_configs"] == [{"targets": ["alertmanager:9093"]}]


def test_promtool_accepts_the_rules_and_each_has_for_severity_and_text() -> None:
    result = run(promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for rule in rules:
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == ALERT_NAMES


@pytest.mark.parametrize(("alert", "old", "new"), [
    # The error ratio's threshold raised tenfold: the 10% case no longer fires.
    ("LlamaProxyHighErrorRatio", "  ) > 0.05\n", "  ) > 0.5\n"),
    # The traffic guard dropped: one failure in three requests fires.
    ("LlamaProxyHighErrorRatio", ">= 20", ">= 0"),
    # Child down: a rule that never matches, and one that fires on a ready backend.
    ("LlamaProxyBackendNotReady", '{state="ready"} == 0', '{state="ready"} == 2'),
    ("LlamaProxyBackendNotReady", '{state="ready"} == 0', '{state="ready"} >= 0'),
])
def test_the_rules_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str,
                                                   new: str) -> None:
    text = ALERTS.read_text()
    assert text.count(old) == 1, old
    (tmp_path / ALERTS.name).write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = tool("amtool")
    if amtool is None:
        pytest.fail("amtool is missing: make check-tools (part of make install)")
    result = run(amtool, "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alertmanager_config_has_a_receiver_for_every_route() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(route["receiver"] in receivers for route in routes)
    assert "placeholder" in ALERTMANAGER.read_text().lower()  # documented as such


# -- Grafana ------------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel but the rows (which only group them)."""
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "llama-proxy"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                                 .read_text())["datasources"]
    [source] = datasources
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, title
    # No two panels overlap.
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


def test_the_dashboard_has_the_promised_panels() -> None:
    titles = [p["title"].lower() for p in panels()]
    for wanted in PANELS:
        assert any(wanted in title for title in titles), wanted
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert any("llama-server" in row for row in rows)
    # The llama-server row queries llama-server's own metrics.
    exprs = " ".join(t["expr"] for p in panels() if p["title"].startswith("llama-server")
                     for t in p["targets"])
    assert "llamacpp:" in exprs and "llama_proxy_" not in exprs


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's expression (as a recording rule; Grafana's
    $__rate_interval becomes a fixed range)."""
    exprs = [t["expr"].replace("$__rate_interval", "1m") for p in panels() for t in p["targets"]]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    # And a broken one is caught.
    rules.append({"record": "dashboard:broken", "expr": "sum by (le (rate(x[1m]))"})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert run(promtool(), "check", "rules", str(path)).returncode != 0


def test_grafana_provisions_the_dashboard_from_where_compose_mounts_it() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llama-proxy.yml")
                              .read_text())["providers"][0]
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./monitoring/grafana/dashboards"


# -- every metric queried is one the appliance exports ------------------------------------------

METRIC = re.compile(r"(?<![A-Za-z0-9_:])(llama_proxy_[A-Za-z0-9_]+|llamacpp:[A-Za-z0-9_:]+)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")


def names_in(expr: str) -> set[str]:
    """The llama_proxy_* and llamacpp:* metric names a PromQL expression reads (not words in
    its quoted label values)."""
    return set(METRIC.findall(STRING.sub('""', expr)))


def queried() -> dict[str, set[str]]:
    """Metric name -> where it is queried (alert or panel)."""
    out: dict[str, set[str]] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            for name in names_in(rule["expr"]):
                out.setdefault(name, set()).add("alert " + rule["alert"])
    for panel in panels():
        for target in panel["targets"]:
            for name in names_in(target["expr"]):
                out.setdefault(name, set()).add("panel " + panel["title"])
    return out


def exported(text: str) -> set[str]:
    """The names a query may use against this exposition: every sample's name, and for the
    appliance's own families (declared even before their first sample) the family's name with
    its type's sample suffixes. Other families (llamacpp:*) count only through their samples,
    so a name must really arrive to count."""
    samples, families = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[^{\s]+", line).group())
    names = set(samples)
    for name, kind in families.items():
        if not name.startswith("llama_proxy_"):
            continue
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
        names |= {name + s for s in suffixes.get(kind, ("",))}
    return names


def unexported(used: dict[str, set[str]], names: set[str]) -> dict[str, list[str]]:
    """The queried names missing from the exposition, with where each is queried."""
    return {name: sorted(where) for name, where in used.items() if name not in names}


def test_metric_names_are_read_from_promql_with_care() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(llama_proxy_x_seconds_bucket'
            '{route=~"llama_proxy_not_a_metric"}[5m]))) / on() llamacpp:prompt_tokens_total'
            ' and up{job="llama-proxy"}')
    assert names_in(expr) == {"llama_proxy_x_seconds_bucket", "llamacpp:prompt_tokens_total"}
    text = ("# TYPE llama_proxy_h_seconds histogram\n"
            'llama_proxy_h_seconds_bucket{le="+Inf"} 1.0\n'
            "# TYPE llama_proxy_c_total counter\n"  # declared, no sample yet
            "# TYPE llamacpp:declared_only_total counter\n"
            "llamacpp:g 1\n")
    assert exported(text) == {"llama_proxy_h_seconds_bucket", "llama_proxy_h_seconds_sum",
                              "llama_proxy_h_seconds_count", "llama_proxy_c_total",
                              "llamacpp:g"}


async def post(http: aiohttp.ClientSession, proxy: Running, headers: dict[str, str],
               stream: bool = False) -> int:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "stream": stream}
    async with http.post(proxy.base_url + "/v1/chat/completions", json=body,
                         headers=headers) as resp:
        await resp.read()
        return resp.status


@pytest.mark.timeout(180)
async def test_every_metric_queried_is_exported_after_real_traffic(
        make_proxy: ProxyFactory) -> None:
    # As the compose file runs it: the appliance supervising its own llama-server (started with
    # --metrics), so its llamacpp:* metrics ride along labelled backend="llama-server".
    proxy = await make_proxy(limit_rpm=5)

    async def ready() -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy.base_url + "/ready") as resp:
                return resp.status == 200
    await eventually(ready, 120, "the supervised llama-server to be ready")

    auth = {"Authorization": f"Bearer {token_for(proxy, 'alice')}"}
    async with aiohttp.ClientSession() as http:
        served = [await post(http, proxy, auth) for _ in range(2)]
        served += [await post(http, proxy, auth, stream=True) for _ in range(3)]
        limited = [await post(http, proxy, auth) for _ in range(2)]  # past 5 a minute
        missing = await post(http, proxy, {})
        forged = await post(http, proxy, {"Authorization": "Bearer not-a-token"})
        async with http.get(proxy.base_url + "/metrics") as resp:
            assert resp.status == 200  # from this host: no credential needed
            text = await resp.text()
    assert served == [200] * 5 and limited == [429, 429] and missing == forged == 401

    names = exported(text)
    used = queried()
    assert not unexported(used, names), f"queried but not exported: {unexported(used, names)}"
    # llama-server's own metrics arrived, labelled with its backend and model.
    assert any(n.startswith("llamacpp:") for n in used)
    assert re.search(r'^llamacpp:prompt_tokens_total\{[^}]*backend="llama-server"[^}]*\} '
                     r'[1-9]', text, re.MULTILINE), "no llamacpp:prompt_tokens_total > 0"
    assert f'model="{proxy.settings.model_alias}"' in text
    # The comparison can fail: names the appliance does not export are reported.
    wrong = {"llama_proxy_made_up_total", "llamacpp:made_up_total",
             "llama_proxy_requests_bucket",  # a counter has no buckets
             "llama_proxy_open_streams_total"}  # a gauge has no _total
    assert set(unexported({**used, **{n: {"panel made up"} for n in wrong}}, names)) == wrong
