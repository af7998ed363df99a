"""docs/configuration.md, made from the settings schema: every setting with its flag, environment
variable, default and meaning, in the sections of config/settings.py. Written by
`python -m config.reference > docs/configuration.md` (make docs); a test fails when it is stale."""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, Field
from typing import Any

from config.loader import env_for, flag_for
from config.settings import Settings, schema

INTRO = """# Configuration

Every setting has a flag, an environment variable and a key in a TOML file (`--config FILE` or
`LLAMA_PROXY_CONFIG`); precedence is defaults < file < environment < flags. `python -m proxy
check-config [flags]` prints the effective settings (secrets masked) as TOML, and
[`config/example.toml`](../config/example.toml) is a file to start from. Bad configuration stops
start-up with one line naming the setting, for example
`llama-proxy: configuration error: model: /models/x.gguf does not exist or is not a file`.
A list is a repeated flag, a TOML array, or words split as a shell would in the environment; a
switch is `--flag` (on) or `--flag false`, `true`/`false` in TOML, `1`/`0` (or yes/no, on/off) in
the environment.

This page is generated from `config/settings.py` (`make docs`); a test fails when it is stale.
"""
_SECTION = re.compile(r"^\s*# -- (.+)$")
_FIELD = re.compile(r"^\s{4}(\w+): ")


def sections() -> list[tuple[str, list[str]]]:
    """The settings' names under their section comments, in the schema's order."""
    out: list[tuple[str, list[str]]] = [("general", [])]
    for line in inspect.getsource(Settings).splitlines():
        if heading := _SECTION.match(line):
            out.append((heading.group(1).strip(), []))
        elif named := _FIELD.match(line):
            out[-1][1].append(named.group(1))
    return [(title, names) for title, names in out if names]


def _default(f: Field[Any]) -> str:
    if f.metadata.get("secret"):
        return "none (secret)"
    value = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    if value is None or value in ([], ()):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _meaning(f: Field[Any]) -> str:
    text = str(f.metadata.get("help", "")).replace("|", "\\|")  # a table cell
    if choices := f.metadata.get("choices"):
        text += " (" + " \\| ".join(f"`{c}`" for c in choices) + ")"
    return text


def render() -> str:
    fields = {f.name: f for f in schema()}
    parts = [INTRO]
    for title, names in sections():
        parts.append(f"\n## {title[0].upper()}{title[1:]}\n\n")
        parts.append("| setting | flag | environment | default | meaning |\n")
        parts.append("| --- | --- | --- | --- | --- |\n")
        for name in names:
            f = fields[name]
            flag = f"`{flag_for(name)}`" if f.metadata.get("flag", True) else ""
            env = "" if f.metadata.get("kind") == "table" else f"`{env_for(name)}`"
            parts.append(f"| `{name}` | {flag} | {env} | {_default(f)} | "
                         f"{_meaning(f)} |\n")
    return "".join(parts)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
