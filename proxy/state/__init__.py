"""What persists: the Redis store (embedded or not), conversations, owner-only files."""
