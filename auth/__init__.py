"""Who is calling and what they may do: principals, JWTs, API keys in Redis, the token CLI."""
