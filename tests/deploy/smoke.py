#!/usr/bin/env python3
"""Smoke-test the llama-proxy image: its entrypoint serves, its generate_token.py issues a
credential, the openai client streams a chat completion through it, and SIGTERM stops everything.

    python tests/deploy/smoke.py --image llama-proxy:latest [--engine docker|podman]

With docker the image runs as a container (port published on 127.0.0.1). With podman, where
containers cannot start (no cgroups or rlimits for the OCI runtime), buildah runs the image's own
entrypoint in a chroot of the image on the host network. Needs the `openai` package (the dev
requirements) in the Python that runs this. Exits non-zero, saying why, on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
PROMPT = "Write one short sentence about the sea."
SIZES = (
    "du -xsm /opt/models /usr/lib/python3* /usr/lib/x86_64-linux-gnu /usr/bin /usr/share /var"
    " /opt/venv/lib/python3*/site-packages/* 2>/dev/null | sort -rn | head -12"
)


class SmokeError(Exception):
    pass


def run(cmd: list[str], *, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Docker:
    """The image as a real container."""

    def __init__(self, image: str, port: int) -> None:
        self.image, self.port = image, port
        self.name = f"llama-proxy-smoke-{os.getpid()}"

    def config(self) -> dict:
        return json.loads(run(["docker", "image", "inspect", self.image]))[0]["Config"]

    def shell(self, script: str) -> str:
        return run(["docker", "run", "--rm", "--entrypoint", "sh", self.image, "-c", script])

    def start(self) -> None:
        run(["docker", "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000",
             self.image])

    def exec(self, argv: list[str]) -> str:
        return run(["docker", "exec", self.name, *argv])

    def processes(self) -> list[str]:
        out = run(["docker", "top", self.name, "-o", "pid,args"], check=False)
        return [line.strip() for line in out.splitlines()[1:] if line.strip()]

    def sigterm(self) -> int:
        run(["docker", "kill", "--signal", "TERM", self.name])
        code = run(["docker", "wait", self.name], timeout=STOP_TIMEOUT).strip()
        return int(code)

    def logs(self) -> str:
        result = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True)
        return result.stdout + result.stderr

    def left_running(self) -> list[str]:
        state = run(["docker", "inspect", "--format", "{{.State.Status}}", self.name]).strip()
        return [] if state == "exited" else [f"container is {state}"]

    def cleanup(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)


class Buildah:
    """The image's entrypoint in a chroot of the image (buildah run), on the host network."""

    def __init__(self, image: str, port: int) -> None:
        self.image, self.port = image, port
        self.container = run(["buildah", "from", "--pull=never", image]).strip()
        self.root: str | None = None  # the chroot buildah runs the entrypoint in
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="llama-proxy-smoke-", suffix=".log")
        # On the host network the image's 0.0.0.0 would be every interface of this machine.
        self.env = ["-e", "LLAMA_PROXY_HOST=127.0.0.1", "-e", f"LLAMA_PROXY_PORT={port}"]

    def buildah_run(self, argv: list[str]) -> list[str]:
        return ["buildah", "run", "--isolation", "chroot", "--network", "host", *self.env,
                self.container, "--", *argv]

    def config(self) -> dict:
        image = json.loads(run(["podman", "image", "inspect", self.image]))[0]
        return {**image["Config"], "Healthcheck": image.get("Healthcheck")}  # podman: top level

    def shell(self, script: str) -> str:
        """A command in the image as it is (its own environment, no overrides)."""
        return run(["buildah", "run", "--isolation", "chroot", "--network", "host",
                    self.container, "--", "sh", "-c", script])

    def start(self) -> None:
        config = self.config()
        argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
        print(f"    entrypoint: {' '.join(argv)} (user {config.get('User')}, workdir "
              f"{config.get('WorkingDir')})")
        self.proc = subprocess.Popen(self.buildah_run(argv), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def exec(self, argv: list[str]) -> str:
        return run(self.buildah_run(argv))

    @staticmethod
    def _processes() -> Iterator[tuple[int, int, str, str]]:
        """(pid, parent pid, root directory, command line) of every process."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                root = os.readlink(entry / "root")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to read
                continue
            yield int(entry.name), parent, root, args

    def _find_root(self) -> str | None:
        """The chroot of the entrypoint's process tree (buildah run's temporary rootfs)."""
        assert self.proc is not None
        table = {pid: (parent, root) for pid, parent, root, _ in self._processes()}
        for pid, (_, root) in table.items():
            if root == "/":
                continue
            ancestor = pid
            while ancestor in table and ancestor != self.proc.pid:
                ancestor = table[ancestor][0]
            if ancestor == self.proc.pid:
                return root.removesuffix(" (deleted)")
        return None

    def _ours(self) -> dict[int, str]:
        """Every process in the entrypoint's chroot: whatever it started, however detached."""
        if self.root is None and self.proc is not None:
            self.root = self._find_root()
        if self.root is None:
            return {}
        return {pid: args for pid, _, root, args in self._processes()
                if root.removesuffix(" (deleted)") == self.root}

    def processes(self) -> list[str]:
        return [f"{pid} {args}" for pid, args in sorted(self._ours().items())]

    def sigterm(self) -> int:
        assert self.proc is not None
        tini = [pid for pid, args in self._ours().items() if args.startswith("/usr/bin/tini ")]
        if len(tini) != 1:
            raise SmokeError(f"expected one tini (the entrypoint), found {tini}")
        os.kill(tini[0], signal.SIGTERM)  # what `docker stop` sends PID 1
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SmokeError(f"the entrypoint did not exit within {STOP_TIMEOUT:.0f}s") from None

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def left_running(self) -> list[str]:
        time.sleep(0.5)
        return self.processes()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self._ours():
                os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        subprocess.run(["buildah", "rm", self.container], capture_output=True)
        self.log.close()


def wait_ready(engine: Docker | Buildah, base: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if isinstance(engine, Buildah) and engine.proc and engine.proc.poll() is not None:
            raise SmokeError(f"the entrypoint exited with {engine.proc.returncode}")
        try:
            status, _ = get(f"{base}/ready")
        except OSError:
            status = 0
        if status == 200:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SmokeError(f"/ready did not answer 200 within {READY_TIMEOUT:.0f}s")


def stream_chat(base: str, token: str, *, echo: bool = True,
                first: threading.Event | None = None) -> tuple[str, int, str | None]:
    """Stream one answer with the openai client: (text, chunks with content, finish_reason)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    if echo:
        print(f"    model {model}; prompt: {PROMPT!r}\n    reply: ", end="", flush=True)
    parts, finish = [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=48,
        stream=True,
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        if chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if first is not None:
                first.set()
            if echo:
                print(parts[-1], end="", flush=True)
    if echo:
        print()
    return "".join(parts), len(parts), finish


def sigterm_during_a_stream(engine: Docker | Buildah, base: str, token: str) -> int:
    """SIGTERM once a second answer has begun: it still ends whole (the appliance drains)."""
    first, outcome = threading.Event(), {}

    def consume() -> None:
        try:
            outcome["answer"] = stream_chat(base, token, echo=False, first=first)
        except Exception as exc:  # reported below
            outcome["error"] = repr(exc)
        finally:
            first.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    if not first.wait(60) or "error" in outcome:
        raise SmokeError(f"the second stream did not start: {outcome.get('error')}")
    started = time.monotonic()
    code = engine.sigterm()
    print(f"    the entrypoint exited with {code} after {time.monotonic() - started:.1f}s")
    reader.join(30)
    if "answer" not in outcome:
        raise SmokeError(f"the stream in flight at SIGTERM broke: {outcome.get('error')}")
    text, chunks, finish = outcome["answer"]
    print(f"    the stream in flight at SIGTERM ended whole: {chunks} chunks, finish_reason "
          f"{finish!r}")
    if finish not in ("stop", "length"):
        raise SmokeError(f"the stream in flight at SIGTERM ended with {finish!r}: {text!r}")
    return code


def smoke(engine: Docker | Buildah, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    config = engine.config()
    print(f"==> image {engine.image}: user {config.get('User')}, volumes "
          f"{sorted(config.get('Volumes') or {})}, ports "
          f"{sorted(config.get('ExposedPorts') or {})}, healthcheck "
          f"{(config.get('Healthcheck') or {}).get('Test')}")
    if str(config.get("User", "")).split(":")[0] in ("", "0", "root"):
        raise SmokeError("the image runs as root")
    print("==> where the bytes go (MB, inside the image)")
    for line in engine.shell(SIZES).splitlines():
        print(f"    {line}")
    print("==> the image's own settings, as the appliance reads them")
    for line in engine.shell("python -m proxy check-config").splitlines():
        if line.split(" ")[0] in ("host", "port", "data_dir", "auth", "model", "llama_server"):
            print(f"    {line}")

    print("==> starting the image's entrypoint")
    engine.start()
    print(f"    ready after {wait_ready(engine, base):.1f}s")
    health = (config.get("Healthcheck") or {}).get("Test") or []
    if health[:1] != ["CMD"]:
        raise SmokeError(f"the image has no exec-form HEALTHCHECK: {health}")
    print(f"    HEALTHCHECK {' '.join(health[1:])}: {engine.exec(health[1:]).strip()}")
    status, _ = get(f"{base}/v1/models")
    if status != 401:
        raise SmokeError(f"/v1/models without a credential answered {status}, not 401")
    print("    /v1/models without a credential: 401")

    print("==> a credential from the image's generate_token.py")
    token = engine.exec(["python", "generate_token.py", "smoke-test", "1"]).strip().splitlines()[-1]
    print(f"    JWT {token[:16]}...")

    print("==> a streamed chat completion with the openai client")
    text, chunks, _ = stream_chat(base, token)
    if chunks < 2 or not text.strip():
        raise SmokeError(f"expected a streamed answer, got {chunks} chunks: {text!r}")
    print(f"    {chunks} chunks")

    print("==> /metrics, from this host (open on loopback)")
    status, text = get(f"{base}/metrics")
    if status != 200:
        raise SmokeError(f"/metrics answered {status}")
    served = [line for line in text.splitlines() if line.startswith(
        'llama_proxy_requests_total{') and 'route="/v1/chat/completions"' in line]
    model_side = [line for line in text.splitlines() if line.startswith("llamacpp:")]
    if not served or not model_side:
        raise SmokeError("/metrics lacks the chat requests or llama-server's own metrics")
    print(f"    {served[0]}\n    {len(model_side)} llamacpp:* samples, e.g. {model_side[0]}")

    running = engine.processes()
    print("==> running before SIGTERM:")
    for line in running:
        print(f"    {line[:110]}")
    for needed in ("llama-server", "redis-server"):
        if not any(needed in line for line in running):
            raise SmokeError(f"no {needed} among the image's processes")

    print("==> SIGTERM to the entrypoint (as docker stop sends it) while another answer streams")
    code = sigterm_during_a_stream(engine, base, token)
    left = engine.left_running()
    logs = engine.logs()
    if code != 0:
        raise SmokeError(f"exit status {code}; last log lines:\n{logs[-2000:]}")
    if left:
        raise SmokeError(f"still running after the entrypoint exited: {left}")
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise SmokeError(f"port {port} still answers")
    last = [line for line in logs.splitlines() if line.strip()][-3:]
    print("    nothing left running; the appliance's last lines:")
    for line in last:
        print(f"    | {line[:140]}")


def pick_engine(name: str) -> str:
    if name != "auto":
        return name
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("buildah") and shutil.which("podman"):
        return "podman"
    raise SmokeError("neither a docker daemon nor podman/buildah is available")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="llama-proxy:latest")
    parser.add_argument("--engine", default="auto", choices=("auto", "docker", "podman"))
    parser.add_argument("--port", type=int, default=0, help="host port (default: a free one)")
    args = parser.parse_args()
    port = args.port or free_port()
    engine: Docker | Buildah | None = None
    try:
        kind = pick_engine(args.engine)
        print(f"==> smoke test of {args.image} with {kind}, on 127.0.0.1:{port}")
        engine = Docker(args.image, port) if kind == "docker" else Buildah(args.image, port)
        started = time.monotonic()
        smoke(engine, port)
    except (SmokeError, subprocess.TimeoutExpired) as exc:
        print(f"\nSMOKE TEST FAILED: {exc}", file=sys.stderr)
        if engine is not None:
            print("--- the appliance's log (tail) ---", file=sys.stderr)
            print(engine.logs()[-3000:], file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.cleanup()
    print(f"==> smoke test passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
