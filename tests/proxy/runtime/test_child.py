"""The child-process type on its own: output lines, restarts with backoff and give-up, stop
escalation, readiness deadlines (llama-server, Redis and workers use it; see their tests)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from proxy.runtime.child import ChildProcess, LineSplitter, Phase, Restart
from tests.kit.helpers import eventually, pid_alive


def test_line_splitter_cuts_long_lines_and_keeps_going() -> None:
    lines = LineSplitter(limit=10)
    assert lines.feed(b"short\npart") == [b"short"]
    assert lines.feed(b"ial\n") == [b"partial"]
    out = lines.feed(b"y" * 25)  # over the limit with no newline yet: its start goes out now
    assert out == [b"y" * 10 + b" ... (line truncated)"]
    assert lines.feed(b"y" * 1000) == []  # the rest of that line is dropped, memory stays flat
    assert lines.feed(b"yy\nnext\n") == [b"next"]
    assert lines.feed(b"z" * 12 + b"\nlast") == [b"z" * 10 + b" ... (line truncated)"]
    assert lines.rest() == [b"last"]


def script(tmp: Path, name: str, body: str) -> list[str]:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return [str(path)]


async def never() -> bool:
    return False


async def test_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    phases: list[tuple[Phase, str | None]] = []
    lines: list[str] = []
    runs = tmp_path / "runs"
    child = ChildProcess("crasher", lambda: script(tmp_path, "c.sh",
                                                    f"echo run >> {runs}\necho boom\nexit 3\n"),
                         probe=never, restart=Restart(first_delay=0.1, max_delay=0.2,
                                                      give_up_after=3),
                         on_line=lines.append, on_phase=lambda p, why: phases.append((p, why)))
    started = time.monotonic()
    await child.start()
    await eventually(lambda: child.phase is Phase.FAILED, 5, "the child to be given up")
    assert runs.read_text().count("run") == 3
    assert time.monotonic() - started >= 0.3  # waited 0.1 s, then 0.2 s
    assert child.reason == ("exited with code 3 during start-up; gave up after 3 crashes in "
                            "300s")
    assert lines.count("boom") == 3 and list(child.tail)[-1] == "boom"
    assert [p for p, _ in phases].count(Phase.STARTING) >= 3
    await child.stop()
    assert child.phase is Phase.STOPPED


async def test_a_child_ignoring_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    child = ChildProcess("stubborn", lambda: script(
        tmp_path, "s.sh", f"trap '' TERM\necho $$ > {pid_file}\nwhile :; do sleep 0.05; done\n"),
        stop_grace=0.3)
    assert await child.start(wait=True) is True  # no probe: ready once started
    await eventually(pid_file.exists, 5, "the child to write its pid")
    started = time.monotonic()
    await child.stop()
    assert 0.3 <= time.monotonic() - started < 3
    assert not pid_alive(int(pid_file.read_text()))


async def test_a_child_never_ready_is_killed_at_the_deadline(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    child = ChildProcess("hanger", lambda: script(tmp_path, "h.sh",
                                                   f"echo $$ > {pid_file}\nexec sleep 600\n"),
                         probe=never, ready_within=0.3)
    started = time.monotonic()
    assert await child.start(wait=True) is False
    assert time.monotonic() - started < 3
    assert child.phase is Phase.FAILED and "was not healthy within" in (child.reason or "")
    await eventually(lambda: not pid_alive(int(pid_file.read_text())), 2, "the child to die")
    await child.stop()


async def test_a_command_that_cannot_run_is_a_crash_not_an_exception(tmp_path: Path) -> None:
    lines: list[str] = []
    missing = tmp_path / "no-such-binary"
    child = ChildProcess("missing", lambda: [str(missing)], probe=never, on_line=lines.append)
    assert await child.start(wait=True) is False
    assert child.phase is Phase.FAILED and "during start-up" in (child.reason or "")
    assert any(str(missing) in line for line in lines)  # the reason, as the starter said it
    await child.stop()


async def test_an_awaited_first_start_that_fails_is_not_retried(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    child = ChildProcess("once", lambda: script(tmp_path, "o.sh", f"echo x >> {runs}\nexit 1\n"),
                         probe=never, restart=Restart(first_delay=0.05, max_delay=0.05))
    assert await child.start(wait=True) is False  # the caller hears it and decides
    await asyncio.sleep(0.3)
    assert runs.read_text().count("x") == 1 and child.phase is Phase.FAILED
    await child.stop()


async def test_terminate_during_the_restart_wait_starts_nothing_new(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    child = ChildProcess("crashy", lambda: script(tmp_path, "r.sh", f"echo x >> {runs}\nexit 1\n"),
                         restart=Restart(first_delay=0.5, max_delay=0.5))
    await child.start()
    await eventually(lambda: child.reason and "restarting in" in child.reason, 5,
                     "the child to wait for its restart")
    child.terminate()
    await asyncio.sleep(0.8)  # past the restart delay
    assert runs.read_text().count("x") == 1
    await child.stop()
    assert child.phase is Phase.STOPPED


async def test_stop_while_someone_waits_for_the_first_start(tmp_path: Path) -> None:
    child = ChildProcess("slow", lambda: script(tmp_path, "w.sh", "exec sleep 600\n"),
                         probe=never, ready_within=60)
    waiting = asyncio.create_task(child.start(wait=True))
    await eventually(lambda: child.pid is not None, 5, "the child to start")
    await child.stop()
    assert await asyncio.wait_for(waiting, 2) is False  # told, not left waiting for ever
    assert child.phase is Phase.STOPPED
