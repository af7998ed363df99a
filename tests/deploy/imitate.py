#!/usr/bin/env python3
"""Run a unit's ExecStart the way systemd would, where systemd is not PID 1 (containers, CI).

    tests/deploy/imitate.py UNIT [--bind-ro PATH]... [-- COMMAND ARG...]

As root: reads the unit, applies every restriction of it that plain Linux calls can reproduce,
and execs its ExecStart (or COMMAND, as `systemd-run -p ...` would, for generate_token.py), so
the PID of this process becomes the service's main PID. tests/test_systemd.py starts
llama-proxy.service this way; the unit itself is checked with `systemd-analyze verify` there.

Imitated:
  User=, Group= (no supplementary groups), WorkingDirectory=, Environment=, EnvironmentFile=
  (simple NAME=value lines), UMask=, LimitNOFILE=, StateDirectory= with StateDirectoryMode=
  (created and chowned);
  a mount namespace of its own: ProtectSystem=strict (every mount read-only but /dev, /proc and
  /sys), ProtectHome= (an empty tmpfs, mode 0 unless a BindReadOnlyPaths= lies below), PrivateTmp=,
  PrivateDevices= (a /dev with null, zero, full, random, urandom, tty, shm, pts),
  ProtectKernelTunables= and ProtectControlGroups= (/sys read-only), ProtectProc= and ProcSubset=
  (a /proc of its own with hidepid= and subset=pid), StateDirectory= and ReadWritePaths= (the only
  writable places), BindReadOnlyPaths= (PATH form) and --bind-ro (the same, from the command line);
  ProtectHostname= (a UTS namespace);
  CapabilityBoundingSet= (empty only), AmbientCapabilities= (empty), NoNewPrivileges=;
  seccomp filters, built with libseccomp as systemd builds them: SystemCallFilter= (the groups
  expanded by `systemd-analyze syscall-filter`), SystemCallErrorNumber=,
  SystemCallArchitectures=native, RestrictAddressFamilies=, MemoryDenyWriteExecute=,
  LockPersonality=, RestrictNamespaces=yes, RestrictSUIDSGID=, RestrictRealtime=,
  ProtectKernelModules=, ProtectKernelLogs=, ProtectClock= (their system calls), and for
  MemoryDenyWriteExecute= also the kernel's PR_SET_MDWE where it has one (as newer systemd does).
Drop-ins next to the unit (UNIT.d/*.conf) are read after it.
Not imitated (printed at start): PrivateUsers=, the cgroup ones (DevicePolicy=, IPAddress*=,
KillMode=: the caller sends SIGTERM to this process and checks what is left), RemoveIPC=,
KeyringMode=, Restart=; anything else the unit has and this list lacks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import os
import pwd
import resource
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# statvfs's f_flag bit -> the mount flag that keeps it on a remount
KEEP_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
              os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
              os.ST_RELATIME: MS_RELATIME}
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)  # mnt cgroup uts ipc user pid net time
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

SCMP_ACT_KILL_PROCESS, SCMP_ACT_ALLOW = 0x80000000, 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 1, 4, 5, 7

HOME_DIRS = ("/home", "/root", "/run/user")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
HANDLED = {
    "User", "Group", "WorkingDirectory", "Environment", "EnvironmentFile", "ExecStart", "UMask",
    "LimitNOFILE", "StateDirectory", "StateDirectoryMode", "ProtectSystem", "ProtectHome",
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
    "ProtectControlGroups", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
    "ProtectProc", "ProcSubset", "ReadWritePaths", "BindReadOnlyPaths", "ProtectHostname",
    "CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "SystemCallFilter",
    "SystemCallErrorNumber", "SystemCallArchitectures", "RestrictAddressFamilies",
    "MemoryDenyWriteExecute", "LockPersonality", "RestrictNamespaces", "RestrictSUIDSGID",
    "RestrictRealtime",
}

libc = ctypes.CDLL(None, use_errno=True)


def fail(message: str) -> None:
    sys.exit(f"imitate: {message}")


def check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        fail(f"{what}: {os.strerror(code)}")


# -- the unit ------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, list[str]]:
    """[Service] key -> values in order, the unit's drop-ins (UNIT.d/*.conf) after it; an empty
    assignment resets the list, as in systemd."""
    service: dict[str, list[str]] = {}
    lines = path.read_text().splitlines()
    for drop_in in sorted(Path(f"{path}.d").glob("*.conf")):
        lines += ["[Unit]", *drop_in.read_text().splitlines()]
    section, pending = "", ""
    for raw in lines:
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        service[key] = [] if value == "" else [*service.get(key, []), value]
    return service


def last(unit: dict[str, list[str]], key: str, default: str = "") -> str:
    values = unit.get(key)
    return values[-1] if values else default


def yes(unit: dict[str, list[str]], key: str) -> bool:
    return last(unit, key).lower() in ("yes", "true", "on", "1")


def specifiers(value: str, home: str) -> str:
    table = {"S": "/var/lib", "C": "/var/cache", "L": "/var/log", "t": "/run", "h": home,
             "%": "%"}
    out, i = [], 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value):
            if value[i + 1] not in table:
                fail(f"specifier %{value[i + 1]} is not imitated")
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def environment(unit: dict[str, list[str]], user: pwd.struct_passwd) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name,
           "SHELL": user.pw_shell}
    states = [specifiers(f"%S/{d}", user.pw_dir) for d in words(unit, "StateDirectory")]
    if states:
        env["STATE_DIRECTORY"] = ":".join(states)
    for value in unit.get("Environment", []):
        for word in shlex.split(specifiers(value, user.pw_dir)):
            name, _, val = word.partition("=")
            env[name] = val
    for value in unit.get("EnvironmentFile", []):  # read as root, as systemd does
        optional = value.startswith("-")
        path = Path(specifiers(value.lstrip("-"), user.pw_dir))
        if not path.exists():
            if optional:
                continue
            fail(f"EnvironmentFile {path} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            name, val = (part.strip() for part in line.split("=", 1))
            if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
                val = val[1:-1]
            env[name] = val
    return env


def words(unit: dict[str, list[str]], key: str) -> list[str]:
    return [w for value in unit.get(key, []) for w in value.split()]


# -- the mount namespace -------------------------------------------------------------------
def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> int:
    def enc(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def kept_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(flag for bit, flag in KEEP_FLAGS.items() if f_flag & bit)


def remount(path: str, read_only: bool) -> int:
    flags = MS_REMOUNT | MS_BIND | kept_flags(path) | (MS_RDONLY if read_only else 0)
    return mount(None, path, None, flags)


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.append(field.encode().decode("unicode_escape"))
    return points


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


class Sandbox:
    """The mounts, applied parents first (as systemd sorts them), sources opened beforehand."""

    def __init__(self, unit: dict[str, list[str]], state_dirs: list[str],
                 bind_ro: list[str]) -> None:
        self.unit = unit
        self.writable = state_dirs + words(unit, "ReadWritePaths")
        self.bind_ro = bind_ro + words(unit, "BindReadOnlyPaths")
        self.fds: dict[str, int] = {}

    def _open(self, path: str) -> str:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.fds[path]}"

    def apply(self) -> None:
        unit = self.unit
        check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUTS if yes(unit, "ProtectHostname") else 0)),
              "unshare")
        check(mount(None, "/", None, MS_REC | MS_PRIVATE), "making / private")
        # Bind sources are opened in the new namespace (a mount elsewhere cannot be bound),
        # before anything covers them.
        for path in [*self.writable, *self.bind_ro]:
            if not os.path.exists(path):
                fail(f"{path} does not exist")
            self._open(path)
        devices = [d for d in DEVICES if os.path.exists(f"/dev/{d}")]
        if yes(unit, "PrivateDevices"):
            for name in [*devices, "shm"]:
                self._open(f"/dev/{name}")
        if last(unit, "ProtectSystem") == "strict":
            self._read_only_everything()
        elif last(unit, "ProtectSystem"):
            fail("only ProtectSystem=strict is imitated")
        if yes(unit, "ProtectKernelTunables") or yes(unit, "ProtectControlGroups"):
            self._read_only_under("/sys")
        home = last(unit, "ProtectHome")
        if home in ("yes", "true", "tmpfs", "read-only"):
            for top in HOME_DIRS:
                if os.path.isdir(top):
                    self._hide(top, home)
        if yes(unit, "PrivateTmp"):
            for top in ("/tmp", "/var/tmp"):
                check(mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
                      f"PrivateTmp on {top}")
        if yes(unit, "PrivateDevices"):
            self._private_dev(devices)
        for path in sorted(self.writable + self.bind_ro, key=lambda p: p.count("/")):
            if not os.path.lexists(path):  # below a tmpfs mounted above (PrivateTmp=)
                if os.path.isdir(self._open(path)):
                    os.makedirs(path)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Path(path).touch()
            check(mount(self._open(path), path, None, MS_BIND | MS_REC), f"binding {path}")
            check(remount(path, read_only=path in self.bind_ro), f"remounting {path}")
        self._proc()

    def _read_only_everything(self) -> None:
        keep = ("/dev", "/proc", "/sys")
        for point in sorted(set(mount_points()), key=lambda p: p.count("/")):
            if any(under(point, top) for top in keep):
                continue
            if remount(point, read_only=True) != 0 and point == "/":
                check(-1, "ProtectSystem=strict: remounting / read-only")

    def _read_only_under(self, top: str) -> None:
        for point in sorted(set(mount_points())):
            if under(point, top):
                remount(point, read_only=True)

    def _hide(self, top: str, how: str) -> None:
        inside = [p for p in self.bind_ro if under(p, top) and p != top]
        mode = "0755" if how == "tmpfs" or inside else "0000"
        if how == "read-only":
            check(remount(top, read_only=True), f"ProtectHome on {top}")
            return
        check(mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode={mode}"),
              f"ProtectHome on {top}")
        for path in inside:  # mount points for what is bound back in
            os.makedirs(path, mode=0o755, exist_ok=True)
        check(remount(top, read_only=True), f"ProtectHome on {top}")

    def _private_dev(self, devices: list[str]) -> None:
        check(mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC | MS_STRICTATIME,
                    "mode=0755"), "PrivateDevices")
        for name in devices:
            Path(f"/dev/{name}").touch(mode=0o666)
            check(mount(self._open(f"/dev/{name}"), f"/dev/{name}", None, MS_BIND),
                  f"/dev/{name}")
        os.mkdir("/dev/shm")
        check(mount(self._open("/dev/shm"), "/dev/shm", None, MS_BIND | MS_REC), "/dev/shm")
        os.mkdir("/dev/pts")
        check(mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620"), "/dev/pts")
        os.symlink("pts/ptmx", "/dev/ptmx")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{name}")

    def _proc(self) -> None:
        """Last: the bind sources above were /proc/self/fd/N of the old /proc."""
        options = []
        if last(self.unit, "ProtectProc") in ("invisible", "noaccess", "ptraceable"):
            options.append(f"hidepid={last(self.unit, 'ProtectProc')}")
        if last(self.unit, "ProcSubset") == "pid":
            options.append("subset=pid")
        if options:
            check(mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                        ",".join(options)), "ProtectProc/ProcSubset")
        if yes(self.unit, "ProtectKernelTunables") and os.path.isdir("/proc/sys"):
            check(mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC), "/proc/sys")
            check(remount("/proc/sys", read_only=True), "/proc/sys")
        for fd in self.fds.values():
            os.close(fd)


# -- seccomp -------------------------------------------------------------------------------
class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class Filter:
    """One seccomp filter; systemd loads several, and the kernel applies the strictest answer."""

    lib: ctypes.CDLL | None = None

    def __init__(self, default: int) -> None:
        if Filter.lib is None:
            name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
            lib = ctypes.CDLL(name, use_errno=True)
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                   ctypes.c_uint, ctypes.POINTER(ArgCmp)]
            lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
            lib.seccomp_load.argtypes = [ctypes.c_void_p]
            Filter.lib = lib
        self.lib = Filter.lib
        self.ctx = self.lib.seccomp_init(default)
        if not self.ctx:
            fail("seccomp_init failed")
        if default == SCMP_ACT_ALLOW:  # only the allow-list says which architecture
            self.lib.seccomp_attr_set(self.ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ALLOW)

    def rule(self, action: int, name: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call of this architecture
            return
        args = (ArgCmp * max(len(conditions), 1))(*[ArgCmp(*c) for c in conditions])
        result = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(conditions), args)
        if result != 0:
            fail(f"seccomp rule for {name}: {os.strerror(-result)}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        if result != 0:
            fail(f"seccomp_load: {os.strerror(-result)}")


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], check=True,
                         capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif line.startswith("#"):
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in groups:
                fail(f"unknown system call group {name}")
            calls |= expand(groups[name], groups)
        else:
            calls.add(name)
    return calls


def seccomp_filters(unit: dict[str, list[str]]) -> list[Filter]:
    filters: list[Filter] = []
    last_filter: list[Filter] = []  # the allow-list: loaded last, it may not allow seccomp()
    error = last(unit, "SystemCallErrorNumber")
    denied = errno_action(getattr(errno, error)) if error else SCMP_ACT_KILL_PROCESS
    lines = unit.get("SystemCallFilter", [])
    groups = syscall_groups()
    if lines:
        allow_list = not lines[0].startswith("~")
        allowed = expand(["@default"], groups) if allow_list else set()
        for line in lines:
            names = expand(line.lstrip("~").split(), groups)
            if line.startswith("~") == allow_list:  # ~ in an allow-list removes
                allowed -= names
            else:
                allowed |= names
        if not allow_list:
            fail("only an allow-list SystemCallFilter= is imitated")
        arch = last(unit, "SystemCallArchitectures")
        if arch not in ("", "native"):
            fail("only SystemCallArchitectures=native is imitated")
        allow = Filter(denied)
        for name in sorted(allowed):
            allow.rule(SCMP_ACT_ALLOW, name)
        last_filter.append(allow)
    families = words(unit, "RestrictAddressFamilies")
    if families:
        if families[0].startswith("~"):
            fail("only an allow-list RestrictAddressFamilies= is imitated")
        keep = {getattr(socket, f) for f in families}
        nope = Filter(SCMP_ACT_ALLOW)
        for family in range(0, 64):
            if family not in keep:
                nope.rule(errno_action(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
        nope.rule(errno_action(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_GE, 64, 0))
        filters.append(nope)
    extra = Filter(SCMP_ACT_ALLOW)
    eperm = errno_action(errno.EPERM)
    if yes(unit, "MemoryDenyWriteExecute"):  # as systemd 252 does it
        both = PROT_WRITE | PROT_EXEC
        extra.rule(eperm, "mmap", (2, SCMP_CMP_MASKED_EQ, both, both))
        extra.rule(eperm, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        extra.rule(eperm, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        extra.rule(eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    if yes(unit, "LockPersonality"):
        extra.rule(eperm, "personality", (0, SCMP_CMP_NE, 0, 0))  # as systemd: PER_LINUX only
    if yes(unit, "RestrictNamespaces"):
        for flag in NAMESPACE_FLAGS:
            extra.rule(eperm, "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            extra.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        extra.rule(eperm, "setns")
        extra.rule(errno_action(errno.ENOSYS), "clone3")  # so libc falls back to clone
    if yes(unit, "RestrictRealtime"):  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
        for policy in (1, 2, 6):
            extra.rule(eperm, "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
    for key, names in (("ProtectKernelModules", ["@module"]), ("ProtectClock", ["@clock"]),
                       ("ProtectKernelLogs", ["syslog"])):
        if yes(unit, key):
            for name in sorted(expand(names, groups)):
                extra.rule(eperm, name)
    if yes(unit, "RestrictSUIDSGID"):
        for bit in (stat.S_ISUID, stat.S_ISGID):
            extra.rule(eperm, "chmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
            extra.rule(eperm, "fchmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
            extra.rule(eperm, "fchmodat", (2, SCMP_CMP_MASKED_EQ, bit, bit))
    filters.append(extra)
    return filters + last_filter


# -- putting it together -------------------------------------------------------------------
def state_directories(unit: dict[str, list[str]], uid: int, gid: int) -> list[str]:
    mode = int(last(unit, "StateDirectoryMode", "0755"), 8)
    paths = []
    for name in words(unit, "StateDirectory"):
        path = Path("/var/lib") / name
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=mode, exist_ok=True)
        if path.stat().st_uid != uid:  # systemd chowns the tree when the owner changed
            for root, dirs, files in os.walk(path):
                for entry in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.lchown(entry, uid, gid)
        os.chown(path, uid, gid)
        path.chmod(mode)
        paths.append(str(path))
    return paths


def main() -> None:
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[: argv.index("--")] if "--" in argv else argv
    bind_ro = [options[i + 1] for i, o in enumerate(options) if o == "--bind-ro"]
    rest = [o for i, o in enumerate(options) if o != "--bind-ro" and
            (i == 0 or options[i - 1] != "--bind-ro")]
    if len(rest) != 1:
        fail("usage: imitate.py UNIT [--bind-ro PATH]... [-- COMMAND ARG...]")
    if os.geteuid() != 0:
        fail("needs root (to switch user and build a mount namespace)")
    unit = parse_unit(Path(rest[0]))
    user = pwd.getpwnam(last(unit, "User", "root"))
    gid = grp.getgrnam(last(unit, "Group")).gr_gid if last(unit, "Group") else user.pw_gid
    env = environment(unit, user)
    if not command:
        start = specifiers(last(unit, "ExecStart"), user.pw_dir)
        if "$" in start:
            fail("variables in ExecStart= are not imitated")
        command = shlex.split(start.lstrip("@-:+!"))
    skipped = sorted(set(unit) - HANDLED)
    print(f"imitate: not imitated: {', '.join(skipped) or 'nothing'}", file=sys.stderr)
    if unit.get("CapabilityBoundingSet") or unit.get("AmbientCapabilities"):
        fail("only empty CapabilityBoundingSet= and AmbientCapabilities= are imitated")
    filters = seccomp_filters(unit)  # built (and systemd-analyze run) before anything is hidden
    cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    states = state_directories(unit, user.pw_uid, gid)
    Sandbox(unit, states, bind_ro).apply()
    if last(unit, "LimitNOFILE"):
        limit = int(last(unit, "LimitNOFILE"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if limit > hard and hard != resource.RLIM_INFINITY:  # root without CAP_SYS_RESOURCE
            print(f"imitate: LimitNOFILE={limit} lowered to this machine's {hard}",
                  file=sys.stderr)
            limit = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    if "CapabilityBoundingSet" in unit:
        for cap in range(cap_last + 1):
            check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping capabilities")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient capabilities")
    if yes(unit, "NoNewPrivileges") or filters:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "NoNewPrivileges")
    if yes(unit, "MemoryDenyWriteExecute"):  # newer systemd also asks the kernel (6.3+)
        libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
    os.umask(int(last(unit, "UMask", "0022"), 8))
    os.chdir(specifiers(last(unit, "WorkingDirectory", user.pw_dir), user.pw_dir))
    for flt in filters:
        flt.load()
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
