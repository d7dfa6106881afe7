"""Inverse index: codec, in-process and Redis lookups, versioned loads, atomic switch, the Redis-backed app."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from service_fixtures import (REDIS_URL, bundle_dir, bundle_dir_b, redis_ns, run, running_app,  # noqa: F401
                              same_ranking, settings_for)

from sidrec.service import index_store as store
from sidrec.service.cli import main as cli_main
from sidrec.service.index import InProcessIndex, RedisInverseIndex, SidCodec, keys

pytestmark = pytest.mark.redis


@given(st.lists(st.integers(1, 300), min_size=1, max_size=4).flatmap(
    lambda cards: st.tuples(st.just(cards), st.tuples(*[st.integers(0, c - 1) for c in cards]),
                            st.sampled_from([1, 2, 8, 64, 1024]))))
@hsettings(max_examples=60, deadline=None)
def test_codec_pack_split_roundtrip(case):
    cards, sid, span = case
    codec = SidCodec(cards, span)
    p = codec.pack(sid)
    assert 0 <= p < codec.space
    assert int(codec.pack_tensor(torch.tensor([sid]))[0]) == p
    bucket, field = codec.split(p)
    assert bucket * span + int(field) == p
    digits, rest = [], p  # mixed radix decodes back to the codes
    for c in reversed(cards):
        digits.append(rest % c)
        rest //= c
    assert tuple(reversed(digits)) == tuple(sid)


def test_choose_span_bounds_buckets():
    codec = SidCodec((256, 256, 256, 4))
    g = torch.Generator().manual_seed(3)
    packed = torch.unique(torch.randint(0, codec.space, (20_000,), generator=g))
    span = SidCodec.choose_span(packed, codec.space, 128)
    _, counts = torch.unique(packed // span, return_counts=True)
    assert int(counts.max()) <= 128
    _, counts2 = torch.unique(packed // (span * 2), return_counts=True)
    assert int(counts2.max()) > 128  # the largest span that fits


def _missing_sid(sids: list[list[int]]) -> list[int]:
    return next(s for s in ([a, b, c, d] for a in range(8) for b in range(8) for c in range(8) for d in range(4))
                if s not in sids)


def _bundle_index(path):
    return store.read_bundle_index(path)


def test_in_process_lookup(bundle_dir):
    version, sid_map, ids, cards = _bundle_index(bundle_dir)
    idx = InProcessIndex(version, sid_map, ids, cards)
    sids = sid_map.t().tolist()
    assert run(idx.lookup(sids[:50])) == ids[:50]
    assert run(idx.lookup([_missing_sid(sids), sids[3]])) == [None, ids[3]]


def test_redis_load_lookup_idempotent(bundle_dir, redis_ns):
    client, ns = redis_ns
    version, sid_map, ids, cards = _bundle_index(bundle_dir)
    rep = store.load_version(client, ns, version, sid_map, ids, cards, chunk=7)
    assert not rep.skipped and rep.activated and rep.num_items == 300
    n_keys = sum(1 for _ in client.scan_iter(match=f"{ns}:*"))
    again = store.load_version(client, ns, version, sid_map, ids, cards)
    assert again.skipped and sum(1 for _ in client.scan_iter(match=f"{ns}:*")) == n_keys
    # a crashed load (complete=0) is redone, with the same keys
    client.hset(keys(ns, version)["meta"], "complete", "0")
    redo = store.load_version(client, ns, version, sid_map, ids, cards, activate=False)
    assert not redo.skipped and sum(1 for _ in client.scan_iter(match=f"{ns}:*")) == n_keys

    async def lookups():
        idx = await RedisInverseIndex.open(REDIS_URL, ns, version)
        try:
            await idx.attach()
            sids = sid_map.t().tolist()
            calls = []
            orig = idx.client.execute_command

            async def counting(*a, **k):
                calls.append(a[0])
                return await orig(*a, **k)

            idx.client.execute_command = counting
            got = await idx.lookup(sids)
            assert calls == ["EVALSHA"]  # one command, one round trip, for every SID
            assert got == ids
            assert await idx.lookup([_missing_sid(sids), sids[5]]) == [None, ids[5]]
        finally:
            await idx.close()

    run(lookups())


def test_same_version_different_content_refused(bundle_dir, redis_ns):
    client, ns = redis_ns
    version, sid_map, ids, cards = _bundle_index(bundle_dir)
    store.load_version(client, ns, version, sid_map, ids, cards)
    other = list(reversed(ids))
    with pytest.raises(store.IndexStoreError, match="different content"):
        store.load_version(client, ns, version, sid_map, other, cards)
    rep = store.load_version(client, ns, version, sid_map, other, cards, force=True)
    assert not rep.skipped


def test_two_versions_coexist_and_switch_atomically(bundle_dir, bundle_dir_b, redis_ns):
    client, ns = redis_ns
    va, sa, ia, ca = _bundle_index(bundle_dir)
    vb, sb, ib, cb = _bundle_index(bundle_dir_b)
    assert va != vb
    store.load_version(client, ns, va, sa, ia, ca)
    store.load_version(client, ns, vb, sb, ib, cb, activate=False)
    assert client.get(f"{ns}:current").decode() == va
    listed = {v["version"]: v for v in store.list_versions(client, ns)}
    assert listed[va]["current"] and not listed[vb]["current"] and listed[vb]["num_items"] == 200
    assert store.activate_version(client, ns, vb) == va
    assert client.get(f"{ns}:current").decode() == vb and client.get(f"{ns}:previous").decode() == va
    # a version whose load did not complete can never become current
    client.hset(keys(ns, va)["meta"], "complete", "0")
    with pytest.raises(store.IndexStoreError, match="not completely loaded"):
        store.activate_version(client, ns, va)
    assert client.get(f"{ns}:current").decode() == vb
    with pytest.raises(store.IndexStoreError, match="current"):
        store.drop_version(client, ns, vb)
    assert store.drop_version(client, ns, va) >= 2
    assert not list(client.scan_iter(match=f"{ns}:{va}:*"))
    assert [v["version"] for v in store.list_versions(client, ns)] == [vb]

    async def both_apps():  # each app reads its own version's namespace, whatever `current` is
        out = []
        for b in (bundle_dir, bundle_dir_b):
            s = settings_for(b, redis_url=REDIS_URL, redis_namespace=ns, warmup=False)
            async with running_app(s) as (app, c):
                hist = ["item1"] if b == bundle_dir else ["b1"]
                out.append((await c.post("/v1/recommend", json={"history": hist, "top_n": 3})).json())
        return out

    ra, rb = run(both_apps())
    assert all(i["item_id"].startswith("item") for i in ra["items"])
    assert all(i["item_id"].startswith("b") for i in rb["items"])
    assert client.get(f"{ns}:current").decode() == vb  # autoload did not steal the pointer


def test_redis_app_matches_embedded_and_shares_masks(bundle_dir, redis_ns):
    client, ns = redis_ns
    reqs = [{"history": [f"item{i}", f"item{i * 7 % 300}"], "top_n": 5} for i in range(6)]

    async def scenario():
        async with running_app(settings_for(bundle_dir, warmup=False)) as (_, c):
            embedded = [(await c.post("/v1/recommend", json=r)).json() for r in reqs]
        s = settings_for(bundle_dir, redis_url=REDIS_URL, redis_namespace=ns, admin_token="t", warmup=False)
        async with running_app(s) as (app_a, ca), running_app(s) as (app_b, cb):
            ready = (await ca.get("/readyz")).json()
            via_redis = [(await ca.post("/v1/recommend", json=r)).json() for r in reqs]
            batch = (await ca.post("/v1/recommend/batch", json={"requests": reqs})).json()
            info = (await ca.get("/v1/model")).json()
            top = via_redis[0]["items"][0]["item_id"]
            m = await ca.post("/v1/admin/mask", json={"item_ids": [top]}, headers={"Authorization": "Bearer t"})
            await app_b.state.runtime.sync_masks()  # what worker B's background sync does
            after_b = (await cb.post("/v1/recommend", json=reqs[0])).json()
            lookups = app_a.state.metrics.value("sidrec_index_lookup_seconds_count", {"backend": "redis"})
            return embedded, via_redis, batch, ready, info, m.json(), top, after_b, lookups

    embedded, via_redis, batch, ready, info, mask, top, after_b, lookups = run(scenario())
    assert ready["index_reachable"] and info["index"]["backend"] == "redis"
    for e, r, b in zip(embedded, via_redis, batch["results"]):
        assert e["items"] == r["items"]
        assert same_ranking(r["items"], b["items"])
    assert mask["shared"] and mask["num_masked"] == 1
    assert top not in [i["item_id"] for i in after_b["items"]]
    assert lookups >= len(reqs) + 1  # one lookup per /v1/recommend, one for the whole batch
    assert client.sismember(f"{ns}:masked", top)


def test_no_autoload_and_unreachable_redis_refuse_to_start(bundle_dir, redis_ns):
    from sidrec.service.runtime import StartupError

    _, ns = redis_ns

    async def start(**kw):
        async with running_app(settings_for(bundle_dir, warmup=False, **kw)):
            pass

    with pytest.raises(StartupError, match="not loaded.*index load"):
        run(start(redis_url=REDIS_URL, redis_namespace=ns, redis_autoload=False))
    with pytest.raises(StartupError, match="unreachable"):
        run(start(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5))


def test_cli_index_commands(bundle_dir, redis_ns, capsys):
    client, ns = redis_ns
    base = ["--redis-url", REDIS_URL, "--namespace", ns]
    assert cli_main(["index", "load", str(bundle_dir), *base]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["activated"] and not rep["skipped"]
    assert cli_main(["index", "load", str(bundle_dir), *base]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"]
    assert cli_main(["index", "list", *base]) == 0
    assert json.loads(capsys.readouterr().out)[0]["current"]
    assert cli_main(["index", "drop", rep["version"], *base]) == 2
    assert "current" in capsys.readouterr().err
    assert cli_main(["index", "drop", rep["version"], "--force", *base]) == 0
    assert not list(client.scan_iter(match=f"{ns}:*"))
    assert cli_main(["index", "list", "--redis-url", "redis://127.0.0.1:1/0", "--namespace", ns]) == 3
