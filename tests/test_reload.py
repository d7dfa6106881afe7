"""Model lifecycle through the real app: load a version beside the serving one, switch, roll back,
under traffic; refuse broken bundles, paths outside the root and loads that would not fit in
memory while the running model keeps serving; run-time items survive a model change; SIGHUP."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from catalogue_fixtures import TOPICS, text_bundle
from service_fixtures import make_bundle, run, running_app, settings_for

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A bundle root holding two versions of the random-weight bundle (same ids, other weights)."""
    r = tmp_path_factory.mktemp("bundles")
    make_bundle(r / "v1", seed=0)
    make_bundle(r / "v2", seed=5)
    return r


def _version(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["version"]


def _settings(bundle: Path, root: Path, **kw):
    return settings_for(bundle, admin_token=TOKEN, bundle_root=str(root), **kw)


BODY = {"history": ["item1", "item2", "item3"], "top_n": 10, "beam_width": 32}


def test_load_switch_and_roll_back_under_traffic(root):
    v1, v2 = _version(root / "v1"), _version(root / "v2")
    assert v1 != v2

    async def go():
        async with running_app(_settings(root / "v1", root)) as (app, client):
            baseline = {v1: (await client.post("/v1/recommend", json=BODY)).json()["items"]}
            seen, failures, stop = [], [], asyncio.Event()

            async def traffic():
                while not stop.is_set():
                    r = await client.post("/v1/recommend", json=BODY)
                    (seen.append(r.json()["model_version"]) if r.status_code == 200 else failures.append(r.text))
                    await asyncio.sleep(0)

            clients = [asyncio.create_task(traffic()) for _ in range(4)]
            reports = []
            for n in range(3):
                reports.append((await client.post("/v1/admin/model/load", headers=AUTH,
                                                  json={"bundle_path": "v2"})).json())
                await asyncio.sleep(0.05)
                if n == 0:
                    baseline[v2] = (await client.post("/v1/recommend", json=BODY)).json()["items"]
                reports.append((await client.post("/v1/admin/model/rollback", headers=AUTH)).json())
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*clients)
            state = (await client.get("/v1/admin/model", headers=AUTH)).json()
            after = (await client.post("/v1/recommend", json=BODY)).json()
            return baseline, seen, failures, reports, state, after

    baseline, seen, failures, reports, state, after = run(go())
    assert failures == []
    assert set(seen) == {v1, v2}  # both versions answered during the switches, nothing else
    assert [r["model_version"] for r in reports] == [v2, v1] * 3
    assert [r["action"] for r in reports] == ["load", "rollback"] * 3
    assert not reports[0]["reused_loaded_slot"] and all(r["reused_loaded_slot"] for r in reports[1:])
    assert all(r["peak_rss_mb"] > 0 and r["switch_ms"] >= 0 for r in reports)
    assert baseline[v1] != baseline[v2]  # the versions really rank differently
    assert after["model_version"] == v1 and after["items"] == baseline[v1]  # rolled back to the same answers
    assert state["current"]["version"] == v1 and state["previous"]["version"] == v2
    assert len(state["history"]) == 6


def _broken_copies(root: Path, dest: Path) -> dict[str, Path]:
    """Four faults the loader must name: truncated weights, a SID map of another catalogue, a missing
    file, a format version from the future."""
    out = {}
    for name in ("truncated", "sidmap", "missing", "format"):
        shutil.copytree(root / "v2", dest / name)
        out[name] = dest / name
    with open(out["truncated"] / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    make_bundle(dest / "other", n_items=120, seed=9)
    shutil.copy(dest / "other" / "sid_map.safetensors", out["sidmap"] / "sid_map.safetensors")
    (out["missing"] / "item_ids.json").unlink()
    cfg = json.loads((out["format"] / "config.json").read_text())
    cfg["format_version"] = 99
    (out["format"] / "config.json").write_text(json.dumps(cfg))
    return out


def test_bad_bundles_are_refused_at_reload_and_startup_and_the_model_keeps_serving(root, tmp_path):
    from sidrec.service.runtime import StartupError

    bad = _broken_copies(root, root / f"bad-{tmp_path.name}")
    expect = {"truncated": "model.safetensors", "sidmap": "sid_map", "missing": "item_ids.json",
              "format": "format"}
    v1 = _version(root / "v1")

    async def go():
        async with running_app(_settings(root / "v1", root)) as (app, client):
            out = {}
            for name, path in bad.items():
                r = await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": str(path)})
                ok = await client.post("/v1/recommend", json=BODY)
                out[name] = (r.status_code, r.json()["error"], ok.status_code, ok.json()["model_version"])
            return out

    out = run(go())
    for name, (status, error, ok_status, served) in out.items():
        assert status == 422 and error["code"] == "bundle_unusable", (name, error)
        assert expect[name] in error["message"] and "keeps serving" in error["message"], (name, error["message"])
        assert ok_status == 200 and served == v1

    async def start(path):
        async with running_app(_settings(path, root)):
            pass

    for name, path in bad.items():
        with pytest.raises(StartupError, match="refusing to start") as e:
            run(start(path))
        assert expect[name] in str(e.value), (name, str(e.value))


def test_refusals_path_token_memory_and_busy(root, monkeypatch):
    async def go():
        async with running_app(_settings(root / "v1", root)) as (app, client):
            outside = await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": "/etc"})
            no_token = await client.post("/v1/admin/model/load", json={"bundle_path": "v2"})
            same = await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": "v1"})
            nothing = await client.post("/v1/admin/model/rollback", headers=AUTH)
            monkeypatch.setattr("sidrec.service.memory.available_bytes", lambda: 64 << 20)
            memory = await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": "v2"})
            served = (await client.post("/v1/recommend", json=BODY)).json()["model_version"]
            return outside, no_token, same, nothing, memory, served

    outside, no_token, same, nothing, memory, served = run(go())
    assert outside.status_code == 422 and "outside the bundle root" in outside.json()["error"]["message"]
    assert no_token.status_code == 401
    assert same.status_code == 409 and same.json()["error"]["code"] == "already_serving"
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_previous_version"
    assert memory.status_code == 507 and memory.json()["error"]["code"] == "insufficient_memory"
    assert "available" in memory.json()["error"]["message"]
    assert served == _version(root / "v1")


def test_items_added_at_run_time_survive_a_model_change(tmp_path):
    """An item added from text under v1 gets a SID under v2's codebooks before the switch; a deletion
    carries over; a rollback brings v1's own catalogue back."""
    text_bundle(tmp_path / "v1", seed=0)
    text_bundle(tmp_path / "v2", seed=3)
    v1, v2 = _version(tmp_path / "v1"), _version(tmp_path / "v2")
    assert v1 != v2
    history = [f"t3-{i}" for i in range(4)]
    rec = {"history": history, "top_n": 60, "beam_width": 100}

    async def go():
        async with running_app(_settings(tmp_path / "v1", tmp_path, max_beam_width=256)) as (app, client):
            w = await client.post("/v1/items", headers=AUTH, json={"items": [
                {"item_id": "new-perfume", "text": TOPICS[3] + " amber oud", "attributes": {"brand": ["x"]}}]})
            assert w.status_code == 200, w.text
            assert (await client.delete("/v1/items/t1-2", headers=AUTH)).status_code == 200
            sw = (await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": "v2"})).json()
            item = (await client.get("/v1/items/new-perfume")).json()
            gone = (await client.get("/v1/items/t1-2")).json()
            got = await client.post("/v1/recommend", json=rec)
            filt = await client.post("/v1/recommend", json={**rec, "top_n": 5, "filter": {"brand": ["x"]}})
            back = (await client.post("/v1/admin/model/rollback", headers=AUTH)).json()
            item_v1 = (await client.get("/v1/items/new-perfume")).json()
            return sw, item, gone, got.json(), filt.json(), back, item_v1

    sw, item, gone, got, filt, back, item_v1 = run(go())
    assert sw["model_version"] == v2 and sw["migrated_items"] >= 1 and sw["lost_items"] == []
    assert item["sid"][0] == 3 and not item["in_bundle"] and item["attributes"] == {"brand": ["x"]}
    assert gone["deleted"] is True
    assert got["model_version"] == v2 and "new-perfume" in [i["item_id"] for i in got["items"]]
    assert "t1-2" not in [i["item_id"] for i in got["items"]]
    assert [i["item_id"] for i in filt["items"]] == ["new-perfume"]
    assert back["model_version"] == v1 and item_v1["sid"][0] == 3


def test_sighup_reloads_the_bundle_path(root, tmp_path):
    link = root / f"current-{tmp_path.name}"
    link.symlink_to(root / "v1")
    v2 = _version(root / "v2")

    async def go():
        # a path relative to the working directory, as an operator passes it
        async with running_app(_settings(Path(os.path.relpath(link)), root)) as (app, client):
            link.unlink()
            link.symlink_to(root / "v2")
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(300):
                await asyncio.sleep(0.02)
                r = await client.post("/v1/recommend", json=BODY)
                if r.json()["model_version"] == v2:
                    return r.json()["model_version"]
            return None

    try:
        assert run(go()) == v2
    finally:
        link.unlink()


def test_unusable_paths_get_a_422_not_a_500(root):
    """Found by the fuzz drill: a NUL byte in bundle_path made Path.resolve raise."""
    async def go():
        async with running_app(_settings(root / "v1", root)) as (app, client):
            return [await client.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": p})
                    for p in ("v\x002", "nope", "../" * 40 + "etc")]

    for r in run(go()):
        assert r.status_code == 422 and r.json()["error"]["code"] in ("invalid_request", "bundle_unusable"), r.text
