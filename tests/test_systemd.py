"""The systemd unit (systemd/llama-proxy.service) and `make install-service` (systemd/systemd.mk).

systemd is not PID 1 on the machines these tests run on, so the unit is checked with
`systemd-analyze verify` and `systemd-analyze security --offline=true`, and the installed service
is started by tests/deploy/imitate.py: the unit's user, environment file, state directory, mount
sandbox, capabilities and seccomp filters, then its ExecStart. `make install-service` itself runs
inside a private mount namespace whose /etc, /var and /opt are overlays on tmpfs, so it creates
its user, files and directories there and nothing of it reaches this machine.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from config import Settings
from config.paths import bundled_llama_server, bundled_model
from tests.kit.helpers import REPO, free_port, http_status, pid_alive, wait_until

UNIT = REPO / "systemd" / "llama-proxy.service"
MK = REPO / "systemd" / "systemd.mk"
HOME = "/opt/llama-proxy"  # where the unit expects the code, and install-service puts it
INSTALLED = "/etc/systemd/system/llama-proxy.service"
USER = "llama-proxy"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is missing (Debian/Ubuntu: apt-get install systemd)")


def imitate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imitate", REPO / "tests/deploy/imitate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with /opt/llama-proxy pointing at this checkout, so its ExecStart exists."""
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (make install)")
    copy = tmp_path / "llama-proxy.service"
    copy.write_text((text or UNIT.read_text()).replace(HOME, str(REPO)))
    return copy


# -- the unit, offline ---------------------------------------------------------------------
@needs_analyze
def test_the_unit_verifies_without_a_single_message(tmp_path):
    result = analyze("verify", str(runnable_copy(tmp_path)))
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", (
        result.stdout + result.stderr)


@needs_analyze
def test_verify_does_report_mistakes(tmp_path):
    """So the silence above means something with this systemd version."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd").replace(
        "ProtectSystem=strict", "ProtectSystem=strict\nProtectSytem=full")
    result = analyze("verify", str(runnable_copy(tmp_path, broken)))
    output = result.stdout + result.stderr
    assert "mixd" in output and "ProtectSytem" in output, output


@needs_analyze
def test_the_exposure_is_at_most_2():
    result = analyze("security", "--offline=true", "--no-pager",
                     f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNIT))
    output = result.stdout + result.stderr
    found = re.search(r"Overall exposure level for llama-proxy\.service: (\d+\.\d+)", output)
    assert found, output
    open_items = "\n".join(line for line in output.splitlines() if line.startswith("✗"))
    assert float(found.group(1)) <= MAX_EXPOSURE, f"{found.group(0)}\n{open_items}"
    assert result.returncode == 0, output


def test_the_unit_says_what_the_issue_asks():
    unit = imitate_module().parse_unit(UNIT)

    def one(key: str) -> str:
        values = unit.get(key)
        assert values, f"{key}= is not set"
        return values[-1]

    assert one("User") == USER and one("Group") == USER
    assert one("StateDirectory") == "llama-proxy" and one("StateDirectoryMode") == "0700"
    assert one("ExecStart") == f"{HOME}/.venv/bin/python -m proxy"
    assert one("WorkingDirectory") == HOME
    assert one("EnvironmentFile") == "/etc/llama-proxy/env"
    assert "LLAMA_PROXY_DATA_DIR=%S/llama-proxy" in unit["Environment"]
    assert "LLAMA_PROXY_CONFIG=/etc/llama-proxy/config.toml" in unit["Environment"]
    # SIGTERM to the appliance alone: it drains, then stops llama-server and Redis itself.
    assert one("KillMode") == "mixed" and one("KillSignal") == "SIGTERM"
    assert one("Restart") == "on-failure"
    defaults = Settings()
    assert float(one("TimeoutStopSec")) > defaults.shutdown_grace + defaults.child_stop_grace
    assert int(one("LimitNOFILE")) >= 2 * defaults.max_connections
    assert unit["CapabilityBoundingSet"] == [] and unit["AmbientCapabilities"] == []
    assert one("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert unit["SystemCallFilter"][0] == "@system-service"
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("UMask", "0077"),
                       ("PrivateDevices", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("LockPersonality", "yes"),
                       ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("ProtectKernelLogs", "yes"), ("ProtectControlGroups", "yes"),
                       ("MemoryDenyWriteExecute", "yes")]:
        assert one(key) == value, key


def test_install_service_puts_things_where_the_unit_looks():
    text = MK.read_text()
    for name, path in [("SERVICE_HOME", HOME), ("SERVICE_ETC", "/etc/llama-proxy"),
                       ("SERVICE_DATA", "/var/lib/llama-proxy"), ("SERVICE_USER", USER)]:
        assert re.search(rf"^{name}\s*:=\s*{re.escape(path)}\s*$", text, re.M), name


# -- installed, started, used and stopped ---------------------------------------------------
def why_not_imitated(scratch: Path) -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root: it creates a user and mount namespaces (CI runs as root)"
    for tool in ("unshare", "nsenter", "useradd", "userdel", "make", "setpriv", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if ANALYZE is None:
        return "systemd-analyze is missing (apt-get install systemd)"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is missing (apt-get install libseccomp2)"
    if bundled_llama_server() is None or bundled_model() is None:
        return "llama-server or the bundled model is missing (make install)"
    if subprocess.run(["getent", "passwd", USER], capture_output=True, check=False).returncode == 0:
        return f"this machine has a real {USER} user (an installed service): not beside it"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
         f"mount -t tmpfs tmpfs {scratch}; cd {scratch}; mkdir l u w m; "
         "mount -t overlay overlay -o lowerdir=l,upperdir=u,workdir=w m"],
        capture_output=True, check=False, timeout=30)
    if probe.returncode != 0:
        return f"no mount namespace with tmpfs and overlayfs here: {probe.stderr.decode().strip()}"
    return None


class Host:
    """A private mount namespace standing in for a fresh host: /etc, /var and /opt are overlays
    (what is written there vanishes with the namespace), this checkout is /opt/llama-proxy
    (read-only), and systemd looks not running (no systemctl reaches this machine's)."""

    def __init__(self, scratch: Path) -> None:
        setup = "\n".join([
            "set -e",
            f"mount -t tmpfs tmpfs {scratch}",
            *(f"mkdir {scratch}/{d}.up {scratch}/{d}.work && mount -t overlay overlay -o "
              f"lowerdir=/{d},upperdir={scratch}/{d}.up,workdir={scratch}/{d}.work /{d}"
              for d in ("etc", "var", "opt")),
            f"mkdir -p {HOME} && mount --bind {REPO} {HOME} && mount -o remount,bind,ro {HOME}",
            "if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi",
            "echo ready",
            "exec sleep 900",
        ])
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"setting up the namespace failed: {self.proc.stderr.read()}")

    def argv(self, *command: str) -> list[str]:
        return ["nsenter", "--target", str(self.proc.pid), "--mount", "--", *command]

    def run(self, *command: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*command), capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        return result

    def make(self, *targets: str) -> subprocess.CompletedProcess[str]:
        # -f both: works before and after the Makefile includes systemd.mk (it has a guard)
        return self.run("make", "--no-print-directory", "-C", HOME, "-f", "Makefile", "-f",
                        "systemd/systemd.mk", *targets, timeout=300)

    def stat(self, path: str) -> str:
        return self.run("stat", "-c", "%a %U %G", path).stdout.strip()

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    scratch = tmp_path / "host"
    scratch.mkdir()
    scratch.chmod(0o700)
    reason = why_not_imitated(scratch)
    if reason:
        pytest.skip(reason)
    host = Host(scratch)
    try:
        yield host
    finally:
        host.close()


def process_tree(root: int) -> dict[int, tuple[str, str]]:
    """pid -> (name, start time) of root and everything below it."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(entry.name)
        info[pid] = (name, fields[19])
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            tree[pid] = info[pid]
            todo.extend(children.get(pid, []))
    return tree


def still_running(pid: int, started: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[19] == started and pid_alive(pid)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def http(url: str, body: dict | None = None, token: str | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.timeout(600)
def test_install_start_serve_stop_uninstall(host: Host, tmp_path: Path):
    # -- install, twice: the second run changes nothing and keeps the secrets
    first = host.make("install-service").stdout
    assert "new /etc/llama-proxy/env" in first and "verify: clean" in first, first
    passwd = host.run("getent", "passwd", USER).stdout.strip().split(":")
    assert passwd[5:] == ["/var/lib/llama-proxy", "/usr/sbin/nologin"], passwd
    uid = int(passwd[2])
    port, admin_key = free_port(), secrets.token_hex(24)
    host.run("sh", "-c", f"printf 'LLAMA_PROXY_PORT={port}\\nLLAMA_PROXY_ADMIN_KEY={admin_key}\\n'"
             " >> /etc/llama-proxy/env")
    second = host.make("install-service").stdout
    assert "new /etc/llama-proxy" not in second and "verify: clean" in second, second
    assert f"LLAMA_PROXY_ADMIN_KEY={admin_key}" in host.run("cat", "/etc/llama-proxy/env").stdout
    assert host.stat("/etc/llama-proxy/env") == "600 root root"
    assert host.stat("/etc/llama-proxy/config.toml") == f"640 root {USER}"
    assert host.stat("/etc/llama-proxy") == f"750 root {USER}"
    assert host.stat("/var/lib/llama-proxy") == f"700 {USER} {USER}"
    assert host.run("cat", INSTALLED).stdout == UNIT.read_text()
    verify = host.run(ANALYZE or "systemd-analyze", "verify", INSTALLED)
    assert (verify.stdout + verify.stderr).strip() == ""
    # ... and all of it inside the namespace: this machine has none of it
    assert not Path("/etc/llama-proxy").exists() and not Path("/var/lib/llama-proxy").exists()
    assert subprocess.run(["getent", "passwd", USER], check=False).returncode == 2

    # -- what the service may write: its state directory, and nothing else
    script = ("for p in /var/lib/llama-proxy /tmp /opt/llama-proxy /etc /var/lib /usr/local; do "
              "touch $p/probe 2>/dev/null && rm $p/probe && echo $p; done; "
              "id -un; ls -A /home 2>/dev/null | wc -l")
    probe = host.run(f"{HOME}/.venv/bin/python", f"{HOME}/tests/deploy/imitate.py", INSTALLED, "--",
                     "/bin/sh", "-c", script)
    assert probe.stdout.split() == ["/var/lib/llama-proxy", "/tmp", USER, "0"], probe

    # -- start it as the unit would, and use it
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        service = subprocess.Popen(
            host.argv(f"{HOME}/.venv/bin/python", f"{HOME}/tests/deploy/imitate.py", INSTALLED),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    tree: dict[int, tuple[str, str]] = {}
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert service.poll() is None, f"the service exited:\n{log_path.read_text()[-4000:]}"
            return http_status(f"{base}/ready") == 200

        wait_until(ready, 180, "the service to be ready", interval=0.5)
        token = host.make("service-token", "ARGS=alice 1").stdout.strip().splitlines()[-1]
        code, answer = http(f"{base}/v1/chat/completions", token=token, body={
            "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8})
        assert code == 200, answer
        assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"]
        code, keys = http(f"{base}/admin/keys", token=admin_key)  # the env file's secret
        assert code == 200, keys

        tree = process_tree(service.pid)
        names = sorted(name for name, _ in tree.values())
        assert "llama-server" in names and "redis-server" in names, names
        for pid in tree:
            st = status(pid)
            assert st["Uid"].split() == [str(uid)] * 4, (pid, st["Uid"])
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (pid, st)
            assert int(st["CapBnd"], 16) == 0 and int(st["CapEff"], 16) == 0, (pid, st)

        # -- stop: SIGTERM to the main process (KillMode=mixed), within TimeoutStopSec
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0, log_path.read_text()[-4000:]
        wait_until(lambda: not any(still_running(p, t) for p, t in tree.items()), 5,
                   "the service's processes to be gone")
    finally:
        if service.poll() is None:
            tree = tree or process_tree(service.pid)  # a failure before it was read leaks nothing
            service.kill()
            service.wait(10)
        for pid, started in tree.items():
            if still_running(pid, started):
                os.kill(pid, signal.SIGKILL)
    log = log_path.read_text()
    assert "not imitated: " in log and "stopping llama-server" in log, log[-4000:]

    # -- uninstall: everything but the data; PURGE=1 the data too (the code here is the checkout)
    out = host.make("uninstall-service").stdout
    assert "kept /var/lib/llama-proxy" in out, out
    assert not host.exists(INSTALLED) and not host.exists(f"{INSTALLED}.d")
    assert not host.exists("/etc/llama-proxy") and host.exists("/var/lib/llama-proxy/jwt.secret")
    assert host.run("getent", "passwd", USER, check=False).returncode == 2
    assert host.run("getent", "group", USER, check=False).returncode == 2
    out = host.make("uninstall-service", "PURGE=1").stdout
    assert not host.exists("/var/lib/llama-proxy") and host.exists(f"{HOME}/Makefile"), out

