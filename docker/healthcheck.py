#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the appliance's /ready answers 200, 1 otherwise.

Reads the appliance's own settings (LLAMA_PROXY_* and LLAMA_PROXY_CONFIG, as `python -m proxy`
does), so a changed port or TLS is followed. No proxy from the environment is used.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from config import ConfigError, load_settings

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def main() -> int:
    try:
        settings = load_settings(serving=False)
    except ConfigError as exc:
        print(f"unhealthy: configuration error: {exc}")
        return 1
    host = WILDCARDS.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    scheme = "http"
    if settings.tls_cert is not None:  # the certificate names a domain, not loopback
        scheme = "https"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    url = f"{scheme}://{host}:{settings.port}/ready"
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
