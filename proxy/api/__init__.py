"""The routes clients call: /v1, /api/chat, /admin, usage, /metrics, /openapi.json, the page;
the table from errors to answers."""
