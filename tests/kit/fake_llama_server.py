"""A stand-in for llama-server as a supervised child: takes its flags (--port, --host; the rest
ignored), answers /health, and otherwise is the fast fake upstream (tests/kit/fake_upstream.py).
FAKE_LLAMA_START: seconds it takes to start listening (a model loading), FAKE_LLAMA_FAIL=1:
exit at once with an error, as llama-server does with a bad model. For catalog mechanics at
speed; the real model has its own tests."""

from __future__ import annotations

import argparse
import os
import sys
import time

from aiohttp import web

from tests.kit.fake_upstream import make_app


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    if os.environ.get("FAKE_LLAMA_FAIL") == "1":
        print("error: failed to load model", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_LLAMA_START", "0")))
    app = make_app()
    app.router.add_get("/health", health)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
