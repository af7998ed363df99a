"""Command line: `python -m proxy [serve|check-config] [flags]`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from config import ConfigError, add_arguments, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-proxy",
        description="Serve a llama.cpp model over an authenticated, rate-limited OpenAI API.",
        epilog="Settings come from defaults < --config TOML < LLAMA_PROXY_* env < flags. "
        "Pass llama-server flags with a value as one word: --llama-arg='--ctx-size 4096'.",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "check-config"),
                        help="serve (default) or print the effective settings and exit")
    add_arguments(parser)
    parser.add_argument("--worker-settings", help=argparse.SUPPRESS)  # set by --workers
    return parser


def check_config(settings_dict: dict[str, object]) -> str:
    """The effective settings as TOML, secrets masked, so they can be pasted into a file."""
    import orjson

    lines = []
    for key, value in settings_dict.items():
        if key == "models":
            continue
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {orjson.dumps(value).decode()}")
    lines.append("\n# the model catalog: the first is the default model")
    for entry in settings_dict.get("models") or []:
        assert isinstance(entry, dict)
        name = entry.pop("id") or "(the upstreams' own)"
        lines.append(f"\n[models.{orjson.dumps(name).decode()}]")
        lines += [f"{key} = {orjson.dumps(value).decode()}" for key, value in entry.items()
                  if value not in (None, [], ())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    worker_file = args.pop("worker_settings", None)
    try:
        if worker_file:
            return _run_worker(worker_file)
        settings = load_settings(args)
        if command == "check-config":
            print(check_config(settings.masked()))
            return 0
        if settings.workers > 1:
            shared_metrics_dir(settings.data_dir)  # before prometheus-client is imported
        from proxy.observe.logs import setup_logging
        from proxy.server import serve

        setup_logging(settings.log_level, settings.log_format)
        _run(serve(settings, reload_from=functools.partial(load_settings, args)))
    except ConfigError as exc:
        print(f"llama-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def shared_metrics_dir(data_dir: Path) -> None:
    """With --workers every process writes its metrics to files here and a scrape of any one
    adds them up (prometheus-client's multiprocess mode, chosen when the library is imported;
    the workers inherit the variable). Emptied at each start: counters begin at zero."""
    import shutil

    path = data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _run_worker(path: str) -> int:
    """An extra --workers process: settings resolved by the first process, no CLI of its own."""
    import orjson

    from proxy.observe.logs import setup_logging
    from proxy.server import serve

    with open(path, "rb") as fh:
        config = orjson.loads(fh.read())
    settings = load_settings(config["settings"], env={})
    slots_from = Path(config["slots_from"]) if config["slots_from"] else None
    setup_logging(settings.log_level, settings.log_format)
    _run(serve(settings, worker=True, slots_from=slots_from))
    return 0


def _run(main_coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional at run time; it is faster, not required
        asyncio.run(main_coro)  # type: ignore[arg-type]
    else:
        uvloop.run(main_coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
