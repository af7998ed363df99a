"""The conversation store on a real Redis: the list is newest first, also for exchanges that
fall within one second."""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from proxy.state.conversations import Conversations, new_id


async def test_conversations_list_newest_first_within_one_second(redis_url: str) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True)  # as the appliance's client
    store = Conversations(redis, ttl_s=60, max_conversations=50)
    principal = f"user-{uuid.uuid4().hex}"
    try:
        order = []
        for n in range(6):  # a few milliseconds apart, well inside one second
            cid = new_id()  # random: a tie in the ranking would order them at random
            await store.append(principal, cid, "m", {"role": "user", "content": f"q{n}"},
                               {"role": "assistant", "content": f"a{n}"})
            order.append(cid)
        for cid in order[:3]:  # asking on in the oldest three makes them the newest again
            await store.append(principal, cid, "m", {"role": "user", "content": "more"})
        listed = [summary.id for summary in await store.list(principal)]
        assert listed == order[:3][::-1] + order[3:][::-1]
    finally:
        await redis.aclose()
