"""The commands behind generate_token.py: issue JWTs, create/list/revoke API keys, snippets, QR.

The key store is reached through `store`, given by the caller (generate_token.py passes the
appliance's own way of opening its Redis). It sits above auth, quota and config, whose keys,
tokens and usage ledger it works on.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from urllib.parse import quote, urlsplit

from redis.asyncio import Redis

from auth.apikeys import KeyStore, parse_key
from auth.tokens import issue_token
from config import ConfigError, Settings, load_settings
from proxy.runtime.tunnel import NGROK_DOMAINS, SKIP_WARNING_HEADER
from quota.ledger import Ledger, Row, today, total

# Opens the key store's Redis for these settings, and closes it on the way out.
StoreOpener = Callable[[Settings], AbstractAsyncContextManager[Redis]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_token.py",
        description="Issue JWTs and API keys for llama-proxy, list and revoke them.",
        epilog="examples:\n  python generate_token.py alice 24\n"
        "  python generate_token.py alice --api-key --rpm 60\n"
        "  python generate_token.py --list\n  python generate_token.py --revoke 3f9a0c1d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("subject", nargs="?", help="user (JWT sub) or key name")
    p.add_argument("hours", nargs="?", type=float, default=24.0,
                   help="JWT lifetime in hours (default 24)")
    p.add_argument("--api-key", action="store_true", help="create an API key instead of a JWT")
    p.add_argument("--list", action="store_true", help="list API keys")
    p.add_argument("--revoke", metavar="PREFIX|JTI", help="revoke an API key or a JWT id")
    p.add_argument("--usage", nargs="?", const="", metavar="PREFIX|SUB",
                   help="usage per day: of one API key (prefix) or user (JWT subject), or "
                   "of everyone")
    p.add_argument("--days", type=int, default=30, help="--usage: how many days back (30)")
    p.add_argument("--scope", action="append", dest="scopes", metavar="SCOPE",
                   help="scope to grant (repeatable; default inference; admin for /admin)")
    p.add_argument("--model", action="append", dest="models", metavar="ID",
                   help="allow only this model (repeatable)")
    p.add_argument("--expires", type=float, metavar="HOURS",
                   help="API key lifetime (default: none)")
    p.add_argument("--owner", default="", help="API key owner (free text)")
    p.add_argument("--rpm", type=int, help="requests per minute for this credential")
    p.add_argument("--tpm", type=int, help="tokens per minute for this credential")
    p.add_argument("--snippets", action="store_true", help="print curl/openai/aider snippets")
    p.add_argument("--qr", action="store_true",
                   help="print a sign-in link to the chat page, and its QR code for a phone")
    p.add_argument("--base-url", help="public URL of the appliance (e.g. your ngrok URL)")
    p.add_argument("--config", metavar="FILE", help="the appliance's TOML settings")
    p.add_argument("--data-dir", help="the appliance's data dir")
    return p


def main(argv: Sequence[str] | None = None, *, store: StoreOpener) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("config", args.config), ("data_dir", args.data_dir)) if v}
    try:
        settings = load_settings(given, serving=False)
        if args.list:
            return asyncio.run(_with_store(store, settings, _list))
        if args.usage is not None:
            return asyncio.run(_with_redis(store, settings,
                                           lambda redis: _usage(settings, redis, args)))
        if args.revoke:
            return asyncio.run(_with_store(store, settings,
                                           lambda keys: _revoke(keys, args.revoke)))
        if not args.subject:
            parser.error("give a subject (user or key name), or --list / --revoke")
        if args.api_key:
            return asyncio.run(_with_store(store, settings,
                                           lambda keys: _new_key(settings, keys, args)))
        return _new_token(settings, args)
    except ConfigError as exc:
        print(f"generate_token.py: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"generate_token.py: {exc}", file=sys.stderr)
        return 2


async def _with_store(store: StoreOpener, settings: Settings,
                      action: Callable[[KeyStore], Awaitable[int]]) -> int:
    return await _with_redis(store, settings, lambda redis: action(KeyStore(redis, 0)))


async def _with_redis(store: StoreOpener, settings: Settings,
                      action: Callable[[Redis], Awaitable[int]]) -> int:
    async with store(settings) as redis:
        return await action(redis)


async def _usage(settings: Settings, redis: Redis, args: argparse.Namespace) -> int:
    """A table of the ledger's days: one principal's (key prefix, JWT subject, or a full
    principal id such as user:alice) or everyone's."""
    ledger = Ledger(redis, settings.usage_retention_days)
    end = today()
    start = end - dt.timedelta(days=max(args.days, 1) - 1)
    who = args.usage
    rows: list[Row] = []
    if not who:
        rows = await ledger.read(None, start, end)
    else:
        for principal in ([who] if ":" in who else [f"key:{who}", f"user:{who}"]):
            rows += await ledger.read(principal, start, end)
    if not rows:
        print(f"no usage recorded from {start} to {end}"
              + (f" for {who}" if who else "")
              + ("" if settings.usage_retention_days else " (usage_retention_days is 0: off)"))
        return 0
    header = ("date", "principal", "requests", "prompt", "completion", "total")
    table = [(r.date, r.principal, r.requests, r.prompt_tokens, r.completion_tokens,
              r.total_tokens) for r in sorted(rows, key=_by_day)]
    table.append(("total", "", *total(rows).values()))
    width = max(len(header[1]), *(len(str(row[1])) for row in table))
    print(f"{header[0]:<10}  {header[1]:<{width}}  " + "  ".join(f"{h:>10}" for h in header[2:]))
    for row in table:
        print(f"{row[0]:<10}  {row[1]:<{width}}  " + "  ".join(f"{v:>10}" for v in row[2:]))
    return 0


def _by_day(row: Row) -> tuple[str, str]:
    return row.date, row.principal


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _list(keys: KeyStore) -> int:
    records = await keys.list()
    if not records:
        print("no API keys yet (create one: python generate_token.py NAME --api-key)")
        return 0
    row = "{:<10} {:<16} {:<9} {:<21} {:<21} {:<21}"
    print(row.format("PREFIX", "NAME", "STATUS", "CREATED", "EXPIRES", "LAST USED"))
    for r in records:
        print(row.format(r.prefix, r.name[:16], r.status(), _when(r.created), _when(r.expires),
                         _when(r.last_used)))
    return 0


async def _revoke(keys: KeyStore, target: str) -> int:
    prefix = parse_key(target) or target
    if len(prefix) == 8 and await keys.revoke(prefix):
        print(f"revoked API key {prefix}")
        return 0
    await keys.revoke_jti(target)
    print(f"revoked token {target} (no API key has that prefix, so it was taken as a JWT id)")
    return 0


async def _new_key(settings: Settings, keys: KeyStore, args: argparse.Namespace) -> int:
    expires = None
    if args.expires:
        expires = dt.datetime.now(dt.UTC).timestamp() + args.expires * 3600
    key, record = await keys.create(args.subject, owner=args.owner, scopes=args.scopes,
                                    models=args.models, expires=expires, rpm=args.rpm,
                                    tpm=args.tpm)
    print(f"API key {record.prefix} for {record.name}; expires {_when(expires)}; "
          "shown once, only its hash is stored:", file=sys.stderr)
    _extras(settings, args, key)
    print(key)
    return 0


def _new_token(settings: Settings, args: argparse.Namespace) -> int:
    token, jti, exp = issue_token(settings, args.subject, args.hours, scopes=args.scopes,
                                  models=args.models, rpm=args.rpm, tpm=args.tpm)
    print(f"JWT for {args.subject}, id {jti}, valid until {_when(exp)}:", file=sys.stderr)
    _extras(settings, args, token)
    print(token)
    return 0


# ngrok's free plan shows browsers a warning page before the app unless a request carries
# SKIP_WARNING_HEADER; the hint goes to every ngrok domain, paid-plan ones too (it does no harm).


def _extras(settings: Settings, args: argparse.Namespace, credential: str) -> None:
    """To the terminal (stderr) only: the credential is never written to a log."""
    base = (args.base_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    if args.snippets:
        print(snippets(base, credential), file=sys.stderr)
    if args.qr:
        link = sign_in_link(base, credential)
        print(qr_code(link), file=sys.stderr)
        print(f"chat page sign-in link (scan the code, or open it; keep it private):\n{link}",
              file=sys.stderr)


def sign_in_link(base: str, credential: str) -> str:
    """The chat page with the credential in the URL fragment: the page takes it from there, and
    a fragment is never sent to any server (nor to ngrok), so it shows up in no access log."""
    return f"{base}/#token={quote(credential, safe='')}"


def is_ngrok(base: str) -> bool:
    return (urlsplit(base).hostname or "").lower().endswith(NGROK_DOMAINS)


def snippets(base: str, credential: str) -> str:
    text = _snippets(base, credential)
    if is_ngrok(base):
        text += f"""
# JavaScript in a browser: ngrok's free plan answers browsers with a warning page first, unless
# the request carries the {SKIP_WARNING_HEADER} header (curl, Python and aider need nothing)
fetch("{base}/v1/chat/completions", {{method: "POST", headers: {{
  "Authorization": "Bearer {credential}", "Content-Type": "application/json",
  "{SKIP_WARNING_HEADER}": "1"}},
  body: JSON.stringify({{messages: [{{role: "user", content: "Hello"}}]}})}})
"""
    return text


def _snippets(base: str, credential: str) -> str:
    return f"""
# curl
curl {base}/v1/chat/completions -H "Authorization: Bearer {credential}" \\
  -H "Content-Type: application/json" -d '{{"messages":[{{"role":"user","content":"Hello"}}]}}'

# Python (pip install openai)
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{credential}")
print(client.chat.completions.create(model="default",
      messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

# aider and other OpenAI tools
export OPENAI_API_BASE="{base}/v1"
export OPENAI_API_KEY="{credential}"
"""


def qr_code(text: str) -> str:
    """A QR code drawn in the terminal by Debian's qrencode (installed by make install)."""
    binary = shutil.which("qrencode")
    if binary is None:
        raise ValueError("--qr needs the qrencode program (apt-get install qrencode)")
    # On stdin, not in argv: another user's `ps` would see the credential there.
    result = subprocess.run([binary, "-t", "UTF8", "-o", "-"], input=text, capture_output=True,
                            text=True, check=True, env={"PATH": os.defpath})
    return result.stdout
