"""The living catalogue through the real app: cold-start items from text, deletions, filters,
item writes' auth and bounds (in-process store), and two replicas against one Redis (db 15).

The two replicas are two ServiceRuntimes (two apps with their own engines, batchers, followers
and Redis clients) in one test process against one Redis namespace: processes would cost a model
load each.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from catalogue_fixtures import TOPICS, text_bundle, topic_text
from service_fixtures import REDIS_URL, redis_ns, run, running_app, settings_for  # noqa: F401

from sidrec.service.catalogue_store import decode_embedding

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tbundle(tmp_path_factory):
    return text_bundle(tmp_path_factory.mktemp("cat") / "bundle")


def _settings(bundle, **kw):
    return settings_for(bundle, admin_token=TOKEN, max_beam_width=256, max_top_n=256, **kw)


def _ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [i["item_id"] for i in resp.json()["items"]]


def _rec(history, top_n=20, beam=100, **kw) -> dict:
    return {"history": history, "top_n": top_n, "beam_width": beam, **kw}


def test_cold_start_item_gets_its_topic_prefix_and_is_recommended(tbundle):
    async def go():
        async with running_app(_settings(tbundle)) as (app, client):
            history = [f"t3-{i}" for i in range(5)]
            r = await client.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": "new-perfume", "text": TOPICS[3] + " limited amber oud", "attributes": {"brand": ["x"]}}]})
            assert r.status_code == 200, r.text
            body = r.json()
            sid = body["items"][0]["sid"]
            base_sid = (await client.get("/v1/items/t3-0")).json()["sid"]
            assert sid[0] == base_sid[0] == 3 and body["catalogue_version"] == 1 and body["applied_locally"]
            rec = await client.post("/v1/recommend", json=_rec(history, top_n=60, beam=100))
            assert "new-perfume" in _ids(rec)
            assert rec.json()["catalogue_version"] == 1
            got = (await client.get("/v1/items/new-perfume")).json()
            assert got["sid"] == sid and got["attributes"] == {"brand": ["x"]} and not got["in_bundle"]
            # attributes only: the SID stays; new text in another topic: the SID moves, the old one maps to nothing
            r2 = await client.post("/v1/items", headers=AUTH,
                                   json={"items": [{"item_id": "new-perfume", "attributes": {"brand": ["y"]}}]})
            assert r2.json()["items"][0]["sid"] == sid
            r3 = await client.post("/v1/items", headers=AUTH,
                                   json={"items": [{"item_id": "new-perfume", "text": TOPICS[5] + " travel kit"}]})
            moved = r3.json()["items"][0]["sid"]
            assert moved[0] == 5 and moved != sid
            rt = app.state.runtime
            emb_moved = rt.follower.emb["new-perfume"]  # the new text's embedding, kept by the attribute update
            np.testing.assert_allclose(decode_embedding(emb_moved),
                                       rt.slot.items.embedder.embed([TOPICS[5] + " travel kit"])[0], atol=2e-3)
            assert await app.state.runtime.index.lookup([sid]) == [None]
            assert await app.state.runtime.index.lookup([moved]) == ["new-perfume"]
            assert (await client.get("/v1/items/new-perfume")).json()["attributes"] == {"brand": ["y"]}
            assert app.state.metrics.value("sidrec_catalogue_version") == 3
            # a fresh engine (as after an engine-process restart) gets the mirror back before traffic
            rt = app.state.runtime
            fresh = type(rt.engine).from_path(str(tbundle), rt.engine.options)
            await client.delete("/v1/items/t3-1", headers=AUTH)
            rt.follower.reapply(fresh)
            assert list(fresh.item_sid("new-perfume")) == moved and fresh.attributes_of("new-perfume") == {"brand": ["y"]}
            res = fresh.recommend([fresh.to_internal(["t3-0"])[0]], 64, 64)  # 65 items, one masked: all others
            got = {fresh.item_ids[i] for i in res.items[0, : int(res.n_valid[0])].tolist()}
            assert "t3-1" not in got and "new-perfume" in got and len(got) == 64
            info = (await client.get("/v1/model")).json()
            assert info["catalogue_version"] == 4 and info["catalogue"]["embedding"]["model"] == "hashed:64"
    run(go())


def test_delete_restore_filter_and_exclude_items(tbundle):
    async def go():
        async with running_app(_settings(tbundle)) as (app, client):
            history = [f"t1-{i}" for i in range(3)]
            before = _ids(await client.post("/v1/recommend", json=_rec(history)))
            gone = before[0]
            d = await client.delete(f"/v1/items/{gone}", headers=AUTH)
            assert d.status_code == 200 and d.json()["updated"] == 1, d.text
            after = _ids(await client.post("/v1/recommend", json=_rec(history)))
            assert gone not in after and len(after) == 20  # masked inside the beam: the list stays full
            assert (await client.get(f"/v1/items/{gone}")).json()["deleted"] is True
            bulk = await client.post("/v1/items/delete", headers=AUTH, json={"item_ids": before[1:3] + ["nope"]})
            assert bulk.json()["unknown_item_ids"] == ["nope"] and bulk.json()["updated"] == 2
            assert not set(before[:3]) & set(_ids(await client.post("/v1/recommend", json=_rec(history))))
            r = await client.post("/v1/items/restore", headers=AUTH, json={"item_ids": before[:3]})
            assert r.status_code == 200 and r.json()["catalogue_version"] == 3
            assert gone in _ids(await client.post("/v1/recommend", json=_rec(history, top_n=60)))
            # filter: attributes set on base items (no text: their SIDs stay); every result passes
            acme = [f"t{t}-{i}" for t in (2, 4, 6) for i in range(4)]
            w = await client.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": i, "attributes": {"brand": ["acme"], "kind": ["a" if n % 2 else "b"]}}
                for n, i in enumerate(acme)]})
            assert w.status_code == 200, w.text
            assert [x["sid"] for x in w.json()["items"]] == [(await client.get(f"/v1/items/{i}")).json()["sid"]
                                                            for i in acme]
            f = _ids(await client.post("/v1/recommend", json=_rec(history, top_n=10, filter={"brand": ["acme"]})))
            assert len(f) == 10 and set(f) <= set(acme)
            f2 = _ids(await client.post("/v1/recommend", json=_rec(history, top_n=6,
                                                                     filter={"brand": ["acme"], "kind": ["a"]})))
            assert set(f2) == set(acme[1::2])
            ex = _ids(await client.post("/v1/recommend", json=_rec(history, exclude_items=after[:5])))
            assert not set(ex) & set(after[:5])
            old = _ids(await client.post("/v1/recommend", json=_rec(history, exclude=after[:5])))
            assert not set(old) & set(after[:5])
            batch = await client.post("/v1/recommend/batch", json={"requests": [
                _rec(history, top_n=5, filter={"brand": ["acme"]}), _rec(history, top_n=5)]})
            res = batch.json()
            assert res["catalogue_version"] == 4 and set(i["item_id"] for i in res["results"][0]["items"]) <= set(acme)
    run(go())


def test_item_writes_need_the_token_and_bound_their_sizes(tbundle):
    async def go():
        item = {"item_id": "n1", "text": "hello world"}
        async with running_app(_settings(tbundle)) as (_, client):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = await client.post("/v1/items", headers=headers, json={"items": [item]})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = await client.delete("/v1/items/t0-0")
            assert r.status_code == 401 and set(r.json()) == {"error"}
            assert (await client.post("/v1/items/restore", json={"item_ids": ["t0-0"]})).status_code == 401
            r = await client.post("/v1/items", headers=AUTH, json={"items": [{"item_id": "n1", "text": "x" * 5000}]})
            assert r.status_code == 422 and "items.0.text" in r.json()["error"]["message"]
            r = await client.post("/v1/items", headers=AUTH,
                                  json={"items": [{"item_id": "n1", "text": "a", "attributes": {"c": ["v"] * 65}}]})
            assert r.status_code == 422 and "items.0.attributes.c" in r.json()["error"]["message"]
            r = await client.post("/v1/items", headers=AUTH,
                                  json={"items": [{"item_id": "n1", "text": "a", "attributes": {"bad name": ["v"]}}]})
            assert r.status_code == 422 and "attributes" in r.json()["error"]["message"]
            r = await client.post("/v1/items", headers=AUTH, json={"items": [{"item_id": "n2"}]})
            assert r.status_code == 422 and "items.0.text" in r.json()["error"]["message"]
            r = await client.post("/v1/items", headers=AUTH, json={"items": [item] * 1001})
            assert r.status_code == 422 and r.json()["error"]["message"].startswith("items")
            r = await client.post("/v1/items", headers=AUTH, json={"items": [item, item]})
            assert r.status_code == 422 and "twice" in r.json()["error"]["message"]
            # one prefix has C_last SIDs: identical texts fill it, the next gets 409 and nothing is written
            same = [{"item_id": f"dup{k}", "text": topic_text(0, 0)} for k in range(5)]
            r = await client.post("/v1/items", headers=AUTH, json={"items": same})
            assert r.status_code == 409 and r.json()["error"]["code"] == "sid_space_full", r.text
            assert (await client.get("/v1/items/dup0")).status_code == 404
            r = await client.post("/v1/items", headers=AUTH, json={"items": same[:2]})
            sids = [tuple(x["sid"]) for x in r.json()["items"]]
            assert r.status_code == 200 and len(set(sids)) == 2
            assert (await client.get("/v1/items/t0-0")).json()["sid"] not in [list(s) for s in sids]
        async with running_app(settings_for(tbundle)) as (_, client):  # no admin token configured
            r = await client.post("/v1/items", headers=AUTH, json={"items": [item]})
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    run(go())


@pytest.mark.redis
def test_two_replicas_share_adds_and_deletes_through_redis(tbundle, redis_ns):
    _, ns = redis_ns

    async def go():
        s = _settings(tbundle, redis_url=REDIS_URL, redis_namespace=ns, catalogue_block_s=0.2)
        history = [f"t6-{i}" for i in range(3)]
        async with running_app(s) as (app_a, a), running_app(s) as (app_b, b):
            r = await a.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": "fresh", "text": TOPICS[6] + " waterproof volume"}]})
            assert r.status_code == 200, r.text
            t0, seen = time.monotonic(), False
            while time.monotonic() - t0 < 1.0 and not seen:
                seen = "fresh" in _ids(await b.post("/v1/recommend", json=_rec(history, top_n=60)))
                await asyncio.sleep(0.02)
            assert seen, "an add on replica A was not served by replica B within 1 s"
            # the text's embedding travelled with the change: B's cold-start blend compares it, not codes
            want = app_a.state.runtime.slot.items.embedder.embed([TOPICS[6] + " waterproof volume"])[0]
            np.testing.assert_allclose(decode_embedding(app_b.state.runtime.follower.emb["fresh"]), want, atol=2e-3)
            eng_b = app_b.state.runtime.engine
            i = eng_b.index_of["fresh"]
            np.testing.assert_allclose(eng_b.cold.vectors(torch.tensor([i]), eng_b.sid_map)[0].numpy(), want,
                                       atol=2e-3)
            top = _ids(await b.post("/v1/recommend", json=_rec(history)))
            victim = top[0]
            app_b.state.runtime.follower.block_s = 5.0  # B's mirror lags: the lookup gate must hold alone
            assert (await a.delete(f"/v1/items/{victim}", headers=AUTH)).status_code == 200
            assert victim not in _ids(await b.post("/v1/recommend", json=_rec(history)))
            t0 = time.monotonic()
            while victim not in app_b.state.runtime.follower.deleted and time.monotonic() - t0 < 1.0:
                await asyncio.sleep(0.01)
            assert victim in app_b.state.runtime.follower.deleted  # B's engine masks it within 1 s
    run(go())


@pytest.mark.redis
def test_a_stopped_replica_catches_up_and_a_trimmed_log_forces_a_resync(tbundle, redis_ns):
    client, ns = redis_ns

    async def go():
        s = _settings(tbundle, redis_url=REDIS_URL, redis_namespace=ns, catalogue_block_s=0.2)
        async with running_app(s) as (app_a, a):
            base = [f"t{t}-{i}" for t in range(8) for i in range(8)]
            for k in range(100):  # 1,000 item changes while B is down: attributes, adds, deletes
                items = [{"item_id": base[(10 * k + j) % 64], "attributes": {"round": [str(k)]}} for j in range(9)]
                items.append({"item_id": f"bulk{k}", "text": f"{TOPICS[k % 8]} batch{k} unique{k * 31}"})
                r = await a.post("/v1/items", headers=AUTH, json={"items": items})
                if r.status_code == 409:  # this text's prefix is full: the add is refused, the rest retried
                    r = await a.post("/v1/items", headers=AUTH, json={"items": items[:-1]})
                assert r.status_code == 200, r.text
                if k % 10 == 0:
                    assert (await a.delete(f"/v1/items/{base[k // 2]}", headers=AUTH)).status_code == 200
            version = app_a.state.runtime.catalogue_version
            assert version == 110
            added = [i for i in app_a.state.runtime.engine.index_of if i.startswith("bulk")]
            assert len(added) > 50
            async with running_app(s) as (app_b, b):
                rb = app_b.state.runtime
                assert rb.catalogue_version == version and (await b.get("/readyz")).status_code == 200
                assert set(added) <= set(rb.engine.index_of) and rb.follower.deleted == {base[k // 2] for k in range(0, 100, 10)}
                assert rb.engine.attributes_of(base[(10 * 99 + 8) % 64]) == {"round": ["99"]}
                # B stops following; 30 more versions; the stream is trimmed past B's position
                await rb.follower.stop()
                for k in range(30):
                    r = await a.post("/v1/items", headers=AUTH, json={"items": [
                        {"item_id": base[k], "attributes": {"late": [str(k)]}}]})
                    assert r.status_code == 200, r.text
                target = app_a.state.runtime.catalogue_version
                assert target == version + 30
                client.xtrim(f"{ns}:{rb.engine.version}:cat:log", maxlen=5, approximate=False)
                rb.follower.resume()
                t0 = time.monotonic()
                while rb.catalogue_version < target and time.monotonic() - t0 < 5.0:
                    await asyncio.sleep(0.02)
                assert rb.catalogue_version == target and rb.follower.resyncs == 1
                assert rb.engine.attributes_of(base[0]) == {"late": ["0"]}
    run(go())


def test_bulk_reader_takes_csv_ndjson_and_names_a_bad_row(tmp_path):
    from sidrec.service.items_cli import read_items

    (tmp_path / "a.csv").write_text('item_id,text,brand,attributes\nx1,red lips,acme|zen,"{""size"": [""s""]}"\n'
                                    "x2,hair,,\n")
    assert list(read_items(tmp_path / "a.csv")) == [
        {"item_id": "x1", "text": "red lips", "attributes": {"size": ["s"], "brand": ["acme", "zen"]}},
        {"item_id": "x2", "text": "hair"}]
    (tmp_path / "b.jsonl").write_text('{"item_id": "y", "text": "t", "attributes": {"k": ["v"]}}\n\n{"text": "t"}\n')
    rows = read_items(tmp_path / "b.jsonl")
    assert next(rows) == {"item_id": "y", "text": "t", "attributes": {"k": ["v"]}}
    with pytest.raises(ValueError, match="b.jsonl:3: no item_id"):
        next(rows)
    with pytest.raises(ValueError, match="unknown format"):
        list(read_items(tmp_path / "c.xlsx"))


@pytest.mark.redis
def test_degraded_reads_keep_the_catalogue_gate_while_redis_is_away(tbundle, redis_ns):
    """With Redis unreachable, lookups come from the replica's mirror: a deleted item still maps
    to nothing, an added item maps from its SID, an item's old SID after a move maps to nothing."""
    import redis.asyncio as aioredis

    from sidrec.service.index import _LOOKUP_LUA

    _, ns = redis_ns

    async def go():
        async with running_app(_settings(tbundle, redis_url=REDIS_URL, redis_namespace=ns)) as (app, client):
            history = [f"t2-{i}" for i in range(3)]
            top = _ids(await client.post("/v1/recommend", json=_rec(history)))
            gone = top[0]
            gone_sid = (await client.get(f"/v1/items/{gone}")).json()["sid"]
            moved_old = (await client.get("/v1/items/t5-1")).json()["sid"]
            assert (await client.delete(f"/v1/items/{gone}", headers=AUTH)).status_code == 200
            w = await client.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": "fresh", "text": TOPICS[2] + " travel size"},
                {"item_id": "t5-1", "text": TOPICS[7] + " relabelled"}]})
            assert w.status_code == 200, w.text
            fresh_sid, moved_new = (x["sid"] for x in w.json()["items"])
            assert moved_new != moved_old
            index = app.state.runtime.index
            real = index.client, index._script
            dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2,
                                           decode_responses=True)
            index.client, index._script = dead, dead.register_script(_LOOKUP_LUA)
            try:
                out = await index.lookup([gone_sid, fresh_sid, moved_old, moved_new])
                assert index.degraded
                rec = await client.post("/v1/recommend", json=_rec(history))
                ready = (await client.get("/readyz")).json()
            finally:
                index.client, index._script = real
                await dead.aclose()
            return out, _ids(rec), ready

    out, rec, ready = run(go())
    assert out == [None, "fresh", None, "t5-1"]
    assert len(rec) == 20  # answered in full while degraded
    assert ready["degraded"] is True and ready["status"] == "ready"


def test_a_server_without_the_text_encoder_answers_503_and_keeps_attribute_updates(tbundle, monkeypatch):
    from sidrec.model.text_embed import MissingEmbedExtra

    async def go():
        async with running_app(_settings(tbundle)) as (app, client):
            def missing(texts, batch_size=256):
                raise MissingEmbedExtra("embedding item text needs sentence-transformers", name="sentence_transformers")

            monkeypatch.setattr(app.state.runtime.items.embedder, "embed", missing)
            new = await client.post("/v1/items", headers=AUTH, json={"items": [{"item_id": "n1", "text": "a lipstick"}]})
            attrs = await client.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": "t0-1", "attributes": {"brand": ["acme"]}}]})
            return new, attrs

    new, attrs = run(go())
    assert new.status_code == 503 and new.json()["error"]["code"] == "embedding_unavailable"
    assert "sentence-transformers" in new.json()["error"]["message"]
    assert attrs.status_code == 200, attrs.text


def test_bulk_ingest_retries_a_busy_service_and_goes_on_past_a_refused_batch(tmp_path):
    import json

    import httpx

    from sidrec.service.items_cli import ingest

    f = tmp_path / "items.jsonl"
    f.write_text("".join(json.dumps({"item_id": f"n{i}", "text": f"item {i}"}) + "\n" for i in range(5)))
    calls: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ids = [it["item_id"] for it in json.loads(request.content)["items"]]
        calls.append(ids)
        if len(calls) == 1:  # busy once: retried after its Retry-After
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "queue_full",
                                                                                    "message": "busy"}})
        if "n2" in ids:  # all or nothing: this batch is refused, the next still goes
            return httpx.Response(409, json={"error": {"code": "sid_space_full", "message": "item n2: full"}})
        return httpx.Response(200, json={"catalogue_version": len(calls), "embedded": len(ids),
                                         "timings_ms": {"embed": 10.0, "store": 1.0, "apply": 1.0}})

    rep = ingest(str(f), "http://svc", "t", batch=2, progress=False, transport=httpx.MockTransport(handler))
    assert calls == [["n0", "n1"], ["n0", "n1"], ["n2", "n3"], ["n4"]]
    assert rep["written"] == 3 and rep["refused_items"] == 2 and rep["embedded"] == 3
    assert rep["refused_batches"] == [{"items": "2..3", "status": 409, "code": "sid_space_full",
                                       "message": "item n2: full"}]
