"""Conversations of /api/chat, kept in Redis per principal.

Each principal's keys are named by a hash of its id, so no request can name another's
conversation: a conversation is found only under the caller's own hash. Per conversation, a
hash of facts (title, model, times) and a list of messages; per principal, a sorted set of its
conversations by last use, trimmed to the newest `max_conversations`. Every write renews the
TTL, and an exchange (the question and its answer) is appended in one transaction, so two
answers in the same conversation at once both land, and a conversation survives a restart with
Redis's AOF.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

ID = re.compile(r"conv_[A-Za-z0-9_-]{16}")
TITLE_CHARS = 60


class ConversationsUnavailable(Exception):
    """Redis could not be reached for a conversation."""


@dataclass(frozen=True)
class Summary:
    id: str
    title: str
    model: str
    created_at: int
    updated_at: int
    messages: int

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "conversation", "title": self.title,
                "model": self.model, "created_at": self.created_at,
                "updated_at": self.updated_at, "messages": self.messages}


@dataclass(frozen=True)
class Conversation:
    summary: Summary
    messages: list[dict[str, str]]

    def public(self) -> dict[str, Any]:
        return {**self.summary.public(), "messages": self.messages}


def new_id() -> str:
    return "conv_" + secrets.token_urlsafe(12)


class Conversations:
    def __init__(self, redis: Redis, ttl_s: float, max_conversations: int) -> None:
        self.redis = redis
        self.ttl = max(int(ttl_s), 1)
        self.max_conversations = max_conversations

    @staticmethod
    def _owner(principal: str) -> str:
        return hashlib.sha256(principal.encode()).hexdigest()[:32]

    def _keys(self, principal: str, cid: str) -> tuple[str, str, str]:
        owner = self._owner(principal)  # hash-tagged: one principal's keys share a slot
        base = f"llp:conv:{{{owner}}}"
        return f"{base}:{cid}", f"{base}:{cid}:m", f"{base}:index"

    async def get(self, principal: str, cid: str) -> Conversation | None:
        if not ID.fullmatch(cid):
            return None
        meta_key, msgs_key, _ = self._keys(principal, cid)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(meta_key)
                pipe.lrange(msgs_key, 0, -1)
                meta, raw = await pipe.execute()
        except RedisError as exc:
            raise ConversationsUnavailable from exc
        if not meta:
            return None
        messages = [orjson.loads(m) for m in raw]
        return Conversation(_summary(cid, meta, len(messages)), messages)

    async def append(self, principal: str, cid: str, model: str,
                     *messages: dict[str, str]) -> None:
        """Add an exchange, creating the conversation (titled by its first message) if new."""
        meta_key, msgs_key, index_key = self._keys(principal, cid)
        now = int(time.time())
        title = next((m["content"] for m in messages if m["role"] == "user"), "")
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(meta_key, "title", _title(title))
                pipe.hsetnx(meta_key, "created_at", now)
                pipe.hset(meta_key, mapping={"updated_at": now, "model": model})
                pipe.rpush(msgs_key, *(orjson.dumps(m).decode() for m in messages))
                # Ranked by the microsecond (exact in a double until the year 2255): exchanges
                # within one second keep their order.
                pipe.zadd(index_key, {cid: time.time_ns() // 1000})
                for key in (meta_key, msgs_key, index_key):
                    pipe.expire(key, self.ttl)
                pipe.zcard(index_key)
                *_, total = await pipe.execute()
            if total > self.max_conversations:
                await self._drop_oldest(principal, index_key, total - self.max_conversations)
        except RedisError as exc:
            raise ConversationsUnavailable from exc

    async def _drop_oldest(self, principal: str, index_key: str, extra: int) -> None:
        oldest = await self.redis.zpopmin(index_key, extra)
        keys = [k for cid, _ in oldest for k in self._keys(principal, cid)[:2]]
        if keys:
            await self.redis.delete(*keys)

    async def list(self, principal: str) -> list[Summary]:
        """Newest first; entries whose conversation has expired are cleaned away."""
        _, _, index_key = self._keys(principal, "")
        try:
            cids = await self.redis.zrevrange(index_key, 0, self.max_conversations - 1)
            if not cids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid in cids:
                    meta_key, msgs_key, _ = self._keys(principal, cid)
                    pipe.hgetall(meta_key)
                    pipe.llen(msgs_key)
                found = await pipe.execute()
            out, gone = [], []
            for cid, meta, count in zip(cids, found[::2], found[1::2], strict=True):
                if meta:
                    out.append(_summary(cid, meta, count))
                else:
                    gone.append(cid)
            if gone:
                await self.redis.zrem(index_key, *gone)
            return out
        except RedisError as exc:
            raise ConversationsUnavailable from exc

    async def delete(self, principal: str, cid: str) -> bool:
        if not ID.fullmatch(cid):
            return False
        meta_key, msgs_key, index_key = self._keys(principal, cid)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(meta_key, msgs_key)
                pipe.zrem(index_key, cid)
                deleted, _ = await pipe.execute()
        except RedisError as exc:
            raise ConversationsUnavailable from exc
        return bool(deleted)


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def _summary(cid: str, meta: dict[str, str], count: int) -> Summary:
    return Summary(cid, meta.get("title", ""), meta.get("model", ""),
                   int(meta.get("created_at", 0)), int(meta.get("updated_at", 0)), count)
