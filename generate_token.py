#!/usr/bin/env python3
"""Issue JWTs and API keys for llama-proxy.

    python generate_token.py alice 24            # JWT for alice, valid 24 h (last line of output)
    python generate_token.py alice --api-key     # new API key, stored hashed, shown once
    python generate_token.py --list              # API keys
    python generate_token.py --revoke PREFIX     # or a JWT id
    python generate_token.py --usage alice       # requests and tokens per day (a user or key)
"""

import sys

from proxy.state.store import store_for_a_tool
from proxy.token_cli import main

if __name__ == "__main__":
    sys.exit(main(store=store_for_a_tool))
