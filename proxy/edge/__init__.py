"""The connection: deadlines, caps, malformed HTTP, the real client behind a proxy, CORS, TLS,
shutdown, ids."""
