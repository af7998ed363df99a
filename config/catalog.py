"""The model catalog: `[models.<id>]` tables of the config file (TOML only), each a model the
appliance can serve, either supervised (a llama-server child started on demand from a `gguf`) or
remote (an OpenAI-compatible server at `url`). Entries left without a value take the top-level
setting of the same name when the settings are resolved (config/loader.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class CatalogError(ValueError):
    """A catalog entry that cannot be used: the loader names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class ModelEntry:
    id: str  # what a request's `model` names ("" for a pool of upstreams that name their own)
    gguf: Path | None = None  # supervised: the model file a llama-server child loads
    urls: tuple[str, ...] = ()  # remote: OpenAI-compatible servers answering for it
    api_key: str | None = None  # sent to the urls
    llama_args: tuple[str, ...] | None = None
    parallel: int | None = None  # llama-server slots (remote: if known; the slot queue's width)
    ctx_size: int | None = None  # llama-server's --ctx-size: the total across its slots
    cache_ram: int | None = None  # MiB of llama-server's host-RAM prompt cache (--cache-ram)
    ttl: float | None = None  # idle seconds before a supervised model is stopped (0: never)
    aliases: tuple[str, ...] = ()
    preload: bool = False  # started with the appliance rather than on its first request
    startup_timeout: float | None = None

    @property
    def supervised(self) -> bool:
        return self.gguf is not None

    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases) if self.id else self.aliases

    def public(self) -> dict[str, Any]:
        """For check-config and the admin API: no key, a URL's password hidden."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                value = "***" if value else None
            elif f.name == "urls":
                value = [_without_password(url) for url in value]
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_LISTS = ("llama_args", "aliases", "urls")
_INTS = ("parallel", "ctx_size", "cache_ram")
_FLOATS = ("ttl", "startup_timeout")
_KEYS = {f.name for f in fields(ModelEntry)} - {"id"} | {"url"}


def parse_models(raw: Any, source: str, base: Path) -> tuple[ModelEntry, ...]:
    """`[models.<id>]` tables (a dict of dicts) as entries, values typed but not yet resolved;
    a relative `gguf` path is taken from base (the config file's directory)."""
    if not isinstance(raw, dict):
        raise CatalogError("models", f"must be tables like [models.my-model] in {source}")
    return tuple(_entry(str(model_id), table, source, base) for model_id, table in raw.items())


def _entry(model_id: str, table: Any, source: str, base: Path) -> ModelEntry:
    where = f"models.{model_id}"
    if not MODEL_ID.match(model_id):
        raise CatalogError(where, "a model id is letters, digits and ._:/@+- (at most 128)")
    if not isinstance(table, dict):
        raise CatalogError(where, f"must be a table in {source}")
    unknown = set(table) - _KEYS
    if unknown:
        raise CatalogError(f"{where}.{sorted(unknown)[0]}", f"unknown model setting in {source}")
    values: dict[str, Any] = {"id": model_id}
    for key, value in table.items():
        name = "urls" if key == "url" else key
        values[name] = _typed(f"{where}.{key}", name, value)
    if "gguf" in values:
        values["gguf"] = base / values["gguf"]  # an absolute path stays as it is
    if "gguf" in values and "urls" in values:
        raise CatalogError(where, "is either `gguf` (run here) or `url` (remote), not both")
    if "api_key" in values and any(urlsplit(u).password or urlsplit(u).username
                                   for u in values.get("urls", ())):
        raise CatalogError(f"{where}.api_key", "a URL with a user or password already says "
                           "how to sign in: give one or the other")
    if "api_key" in values and "urls" not in values:
        raise CatalogError(f"{where}.api_key", "goes with `url`: a model run here gets a "
                           "random key of its own")
    return ModelEntry(**values)


def _typed(where: str, name: str, value: Any) -> Any:
    if name == "urls":
        urls = [value] if isinstance(value, str) else value
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise CatalogError(where, "must be a URL or a list of URLs")
        return tuple(normalise_url(where, u) for u in urls)
    if name in _LISTS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CatalogError(where, "must be a list of strings")
        return tuple(value)
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CatalogError(where, "must be a whole number, 0 or more")
        return value
    if name in _FLOATS:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise CatalogError(where, "must be a number of seconds, 0 or more")
        return float(value)
    if name == "preload":
        if not isinstance(value, bool):
            raise CatalogError(where, "must be true or false")
        return value
    if name == "gguf":
        if not isinstance(value, str) or not value:
            raise CatalogError(where, "must be the path of a GGUF file")
        return Path(value).expanduser()
    if not isinstance(value, str):  # api_key
        raise CatalogError(where, "must be a string")
    return value


def normalise_url(where: str, url: str) -> str:
    """Accept "http://host:port", ".../" or ".../v1"; keep the server root."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CatalogError(where, f"{_without_password(url)!r} is not an http(s) URL")
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def with_defaults(entry: ModelEntry, defaults: dict[str, Any]) -> ModelEntry:
    """Every unset value from the top-level setting of the same name."""
    names = ("llama_args", "parallel", "ctx_size", "cache_ram", "ttl", "startup_timeout")
    if not entry.supervised:  # a remote server's slots are its own: known only if stated
        names = ("ttl", "startup_timeout")
    missing = {name: defaults[name] for name in names if getattr(entry, name) is None}
    if "llama_args" in missing:
        missing["llama_args"] = tuple(missing["llama_args"])
    return replace(entry, **missing)


def check_catalog(entries: tuple[ModelEntry, ...], files: bool = True) -> None:
    """Each entry supervised or remote, every name (id or alias) naming one model only;
    files: that each model file is there (not for generate_token.py)."""
    seen: dict[str, str] = {}
    for entry in entries:
        where = f"models.{entry.id}"
        if entry.gguf is None and not entry.urls:
            raise CatalogError(where, "needs `gguf` (a model to run) or `url` (a server to use)")
        if files and entry.gguf is not None and not entry.gguf.is_file():
            raise CatalogError(f"{where}.gguf", f"{entry.gguf} does not exist or is not a file")
        if entry.parallel is not None and entry.gguf is not None and entry.parallel < 1:
            raise CatalogError(f"{where}.parallel", "must be at least 1")
        for name in entry.names():
            if not MODEL_ID.match(name):
                raise CatalogError(f"{where}.aliases", f"{name!r} is not a valid model name")
            if name in seen:
                raise CatalogError(where, f"the name {name!r} is also {seen[name]}'s")
            seen[name] = entry.id
