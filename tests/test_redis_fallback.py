"""Reads survive a Redis outage (service/index.py): answered from the in-process fallback, marked
degraded, masked items still held back; writes get 503; reads go back to Redis once it answers.

The outage is a client pointed at a closed port (connection refused), swapped in for the real
one and back: the same errors redis-py raises when the server goes away, without stopping the
shared test Redis. loadtests/drill_redis.py does it for real, against a server of its own.
"""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from service_fixtures import REDIS_URL, bundle_dir, redis_ns, run, running_app, settings_for  # noqa: F401
from sidrec.service.index import _LOOKUP_LUA

pytestmark = pytest.mark.redis
TOKEN = "fallback-test-token"


def closed_port_client() -> aioredis.Redis:
    return aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2,
                                   decode_responses=True)


def test_reads_fall_back_while_redis_is_away_and_recover(bundle_dir, redis_ns):  # noqa: F811
    _, ns = redis_ns
    settings = settings_for(bundle_dir, redis_url=REDIS_URL, redis_namespace=ns, admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"history": ["item1", "item2", "item3"], "top_n": 10, "return_sids": True}

    async def go():
        async with running_app(settings) as (app, client):
            index = app.state.runtime.index
            metrics = app.state.metrics
            first = (await client.post("/v1/recommend", json=body)).json()["items"]
            gone = first[0]["item_id"]
            assert (await client.post("/v1/admin/mask", json={"item_ids": [gone], "masked": True},
                                      headers=auth)).status_code == 200
            healthy = (await client.post("/v1/recommend", json=body)).json()["items"]
            assert gone not in {i["item_id"] for i in healthy}

            real_client, real_script = index.client, index._script
            dead = closed_port_client()
            index.client, index._script = dead, dead.register_script(_LOOKUP_LUA)
            try:
                r = await client.post("/v1/recommend", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["items"] == healthy  # the bundle's map, the same answer
                assert index.degraded and metrics.value("sidrec_index_degraded") == 1
                assert metrics.value("sidrec_index_fallback_lookups_total") >= 1
                # The engine's own mask holds `gone` back; the fallback's gate must too, on its own:
                out = await index.lookup([i["sid"] for i in healthy] + [first[0]["sid"]])
                assert out == [i["item_id"] for i in healthy] + [None]  # the masked item's SID maps to nothing
                w = await client.post("/v1/admin/mask", json={"item_ids": ["item5"], "masked": True}, headers=auth)
                assert w.status_code == 503 and w.json()["error"]["code"] == "index_unavailable"
            finally:
                index.client, index._script = real_client, real_script
                await dead.aclose()
            await asyncio.sleep(index.retry_after_s + 0.05)
            r = await client.post("/v1/recommend", json=body)
            assert r.status_code == 200 and r.json()["items"] == healthy
            assert not index.degraded and metrics.value("sidrec_index_degraded") == 0
            before = metrics.value("sidrec_index_fallback_lookups_total")
            await client.post("/v1/recommend", json=body)
            assert metrics.value("sidrec_index_fallback_lookups_total") == before  # Redis again

    run(go())
