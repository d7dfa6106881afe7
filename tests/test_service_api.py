"""HTTP tests of the service: every endpoint and every error shape, on the real app with a small bundle."""
from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from service_fixtures import bundle_dir, make_bundle, run, running_app, settings_for  # noqa: F401

from sidrec.service.app import create_app
from sidrec.service.cli import main as cli_main
from sidrec.service.runtime import StartupError

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def client(bundle_dir):
    app = create_app(settings_for(bundle_dir, admin_token=TOKEN, max_body_bytes=64 * 1024, max_history_len=50,
                                  max_batch_requests=8, max_candidates=20))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return body["error"]


# --- happy paths ------------------------------------------------------------------------------------


def test_health_ready_model_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["warmed"] and ready["index_reachable"]
    info = client.get("/v1/model").json()
    assert info["num_items"] == 300 and info["sid_layout"]["cardinalities"] == [8, 8, 8, 4]
    assert info["metrics"] == {"test": {"R@10": 0.1}} and info["index"]["backend"] == "in_process"
    assert info["version"] == ready["model_version"]
    # a bundle without a transition table or item vectors: the beam's order, stated as such
    assert info["ranking"]["transitions"]["weight"] == 0 and info["ranking"]["transitions"]["table_entries"] is None
    assert info["ranking"]["text_rerank"]["weight"] == 0
    client.post("/v1/recommend", json={"history": ["item1"]})
    text = client.get("/metrics").text
    for name in ("sidrec_requests_total", "sidrec_request_latency_seconds", "sidrec_queue_time_seconds",
                 "sidrec_batch_size", "sidrec_beams_per_request", "sidrec_index_lookup_seconds", "sidrec_model_info"):
        assert name in text, name
    assert 'endpoint="/v1/recommend"' in text
    assert client.get("/docs").status_code == 200 and "/v1/recommend" in client.get("/openapi.json").text


def test_recommend(client):
    r = client.post("/v1/recommend", json={"history": ["item3", "nope", "item7", "item9"], "top_n": 5,
                                           "beam_width": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_history_ids"] == ["nope"] and body["history_used"] == 3
    assert body["beam_width"] == 20 and body["top_n"] == 5
    items = body["items"]
    assert len(items) == 5 and len({i["item_id"] for i in items}) == 5
    assert not {"item3", "item7", "item9"} & {i["item_id"] for i in items}  # exclude_history defaults on
    assert all(len(i["sid"]) == 4 for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    assert r.headers["x-request-id"]


def test_recommend_defaults_exclude_and_sids(client):
    base = client.post("/v1/recommend", json={"history": ["item5"], "top_n": 3, "exclude_history": False}).json()
    assert base["beam_width"] == 32  # the settings default
    top = base["items"][0]["item_id"]
    r = client.post("/v1/recommend", json={"history": ["item5"], "top_n": 3, "exclude_history": False,
                                           "exclude": [top, "unknown-x"], "return_sids": False}).json()
    assert top not in [i["item_id"] for i in r["items"]] and all(i["sid"] is None for i in r["items"])


def test_batch(client):
    reqs = [{"history": ["item1", "item2"], "top_n": 3}, {"history": ["zz"]}, {"history": ["item4"], "top_n": 2,
                                                                                "beam_width": 8}]
    r = client.post("/v1/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res[0]["items"]) == 3 and len(res[2]["items"]) == 2
    assert res[1]["error"]["code"] == "unknown_history"
    single = client.post("/v1/recommend", json=reqs[0]).json()
    assert [i["item_id"] for i in single["items"]] == [i["item_id"] for i in res[0]["items"]]


def test_score(client):
    rec = client.post("/v1/recommend", json={"history": ["item1"], "top_n": 2}).json()["items"]
    r = client.post("/v1/score", json={"history": ["item1", "gone"], "candidates": [rec[0]["item_id"], "nope", "item9"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_candidate_ids"] == ["nope"] and body["unknown_history_ids"] == ["gone"]
    assert [s["item_id"] for s in body["scores"]] == [rec[0]["item_id"], "item9"]
    # ranking mode agrees with the beam search's score of the same SID
    assert body["scores"][0]["log_likelihood"] == pytest.approx(rec[0]["score"], abs=1e-3)
    none = client.post("/v1/score", json={"history": ["item1"], "candidates": ["nope"]}).json()
    assert none["scores"] == [] and none["unknown_candidate_ids"] == ["nope"]


def test_admin_mask(client):
    first = client.post("/v1/recommend", json={"history": ["item2"], "top_n": 3}).json()["items"][0]["item_id"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/v1/admin/mask", json={"item_ids": [first, "ghost"]}, headers=auth)
    assert r.status_code == 200 and r.json()["unknown_item_ids"] == ["ghost"] and r.json()["num_masked"] == 1
    assert client.get("/v1/admin/mask", headers=auth).json()["item_ids"] == [first]
    after = client.post("/v1/recommend", json={"history": ["item2"], "top_n": 3}).json()["items"]
    assert first not in [i["item_id"] for i in after]
    client.post("/v1/admin/mask", json={"item_ids": [first], "masked": False}, headers=auth)
    again = client.post("/v1/recommend", json={"history": ["item2"], "top_n": 3}).json()["items"]
    assert again[0]["item_id"] == first
    assert_error(client.post("/v1/admin/mask", json={"item_ids": [first]}), 401, "unauthorized")
    e = client.post("/v1/admin/mask", json={"item_ids": [first]}, headers={"Authorization": "Bearer wrong"})
    assert_error(e, 401, "unauthorized")


def test_admin_disabled_without_token(bundle_dir):
    with TestClient(create_app(settings_for(bundle_dir, warmup=False))) as c:
        err = assert_error(c.post("/v1/admin/mask", json={"item_ids": ["item1"]},
                                  headers={"Authorization": "Bearer x"}), 403, "admin_disabled")
        assert "SIDREC_ADMIN_TOKEN" in err["message"]


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, code, where", [
    ({"history": ["item1"], "bogus": 1}, "invalid_request", "bogus"),
    ({"history": "item1"}, "invalid_request", "history"),
    ({}, "invalid_request", "history"),
    ({"history": ["item1"], "top_n": 0}, "invalid_request", "top_n"),
    ({"history": ["item1"], "top_n": 20, "beam_width": 10}, "invalid_request", "beam_width"),
    ({"history": ["item1"], "beam_width": 257}, "invalid_request", "beam_width"),
    ({"history": ["item1"], "top_n": 300, "beam_width": 256}, "invalid_request", "top_n"),
    ({"history": ["item1"] * 51}, "invalid_request", "history"),
    ({"history": ["x" * 200]}, "invalid_request", "history.0"),
    ({"history": [""]}, "invalid_request", "history.0"),
    ({"history": []}, "empty_history", "history"),
    ({"history": ["nope", "nada"]}, "unknown_history", "history"),
])
def test_recommend_422(client, body, code, where):
    err = assert_error(client.post("/v1/recommend", json=body), 422, code)
    assert err["message"].startswith(where), err


def test_beam_smaller_than_top_n_message(client):
    err = assert_error(client.post("/v1/recommend", json={"history": ["item1"], "top_n": 20, "beam_width": 10}),
                       422, "invalid_request")
    assert "beam_width (10) must be >= top_n (20)" in err["message"]


def test_other_422s(client):
    assert_error(client.post("/v1/recommend/batch", json={"requests": [{"history": ["item1"]}] * 9}),
                 422, "invalid_request")
    assert_error(client.post("/v1/recommend/batch", json={"requests": []}), 422, "invalid_request")
    assert_error(client.post("/v1/score", json={"history": ["item1"], "candidates": ["item2"] * 21}),
                 422, "invalid_request")
    assert_error(client.post("/v1/score", json={"history": ["item1"], "candidates": []}), 422, "invalid_request")
    assert_error(client.post("/v1/score", json={"history": ["q"], "candidates": ["item2"]}), 422, "unknown_history")
    bad_json = client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad_json, 422, "invalid_request")


def test_404_405(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.get("/v1/recommend"), 405, "method_not_allowed")


def test_413_content_length_and_streamed(client):
    big = b'{"history": ["' + b"a" * (70 * 1024) + b'"]}'
    assert_error(client.post("/v1/recommend", content=big, headers={"content-type": "application/json"}),
                 413, "payload_too_large")

    def chunks():  # no Content-Length: chunked transfer
        for _ in range(20):
            yield b" " * 8192

    assert_error(client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"}),
                 413, "payload_too_large")


def test_500_hides_exception_text(bundle_dir):
    with TestClient(create_app(settings_for(bundle_dir, warmup=False)), raise_server_exceptions=False) as c:
        rt = c.app.state.runtime

        def boom(*a, **k):
            raise RuntimeError("secret-internal-detail")

        rt.engine.recommend = boom
        r = c.post("/v1/recommend", json={"history": ["item1"]})
        err = assert_error(r, 500, "internal_error")
        assert "secret" not in r.text and err["details"]["request_id"] == r.headers["x-request-id"]


def test_503_when_not_ready(bundle_dir):
    async def scenario():
        import httpx

        app = create_app(settings_for(bundle_dir))  # lifespan never run: nothing loaded
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert_error(await c.post("/v1/recommend", json={"history": ["item1"]}), 503, "not_ready")
            r = await c.get("/readyz")
            assert_error(r, 503, "not_ready") and r.headers["retry-after"] == "1"
            assert (await c.get("/healthz")).status_code == 200

    run(scenario())


def test_429_with_retry_after_and_504(bundle_dir):
    async def scenario():
        s = settings_for(bundle_dir, max_queue_size=1, max_queue_delay_ms=0.0, request_timeout_s=0.5, warmup=False)
        async with running_app(s) as (app, c):
            rt = app.state.runtime
            blocker = asyncio.ensure_future(rt.batcher.run_exclusive(lambda: time.sleep(0.8)))
            await asyncio.sleep(0.05)
            rs = await asyncio.gather(*[c.post("/v1/recommend", json={"history": ["item1"]}) for _ in range(5)])
            codes = sorted(r.status_code for r in rs)
            assert 429 in codes and 504 in codes, codes
            full = next(r for r in rs if r.status_code == 429)
            assert_error(full, 429, "queue_full")
            assert int(full.headers["retry-after"]) >= 1
            assert_error(next(r for r in rs if r.status_code == 504), 504, "timeout")
            await blocker
            assert (await c.post("/v1/recommend", json={"history": ["item1"]})).status_code == 200

    run(scenario())


def test_broken_bundle_refuses_to_start(tmp_path):
    path = make_bundle(tmp_path / "broken", n_items=50)
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    with pytest.raises(StartupError, match="refusing to start.*model.safetensors"):
        with TestClient(create_app(settings_for(path))):
            pass
    with pytest.raises(StartupError, match="refusing to start"):
        with TestClient(create_app(settings_for(tmp_path / "missing"))):
            pass


def test_cli_serve_refuses_missing_bundle(tmp_path, capsys):
    assert cli_main(["serve", "--bundle", str(tmp_path / "nothing")]) == 2
    assert "refusing to start" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_serves_and_answers(bundle_dir):
    """`bash deploy/quickstart.sh --check` against an existing bundle: real uvicorn, real socket."""
    import os
    import socket
    import subprocess
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SIDREC_SKIP_SETUP="1", SIDREC_BUNDLE_PATH=str(bundle_dir), SIDREC_PORT=str(port),
               SIDREC_NUM_THREADS="1", SIDREC_LOG_LEVEL="warning")
    env.pop("SIDREC_REDIS_URL", None)
    out = subprocess.run(["bash", "deploy/quickstart.sh", "--check"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"curl -s -X POST http://127.0.0.1:{port}/v1/recommend" in out.stdout
    assert '"items":[{"item_id":"item' in out.stdout


def test_engine_process_mode(bundle_dir, tmp_path):
    """The default deployment: the engine in a child process. Same answers; a dead engine fails
    readiness (not liveness: the watchdog restarts it, see test_engine_watchdog.py) and its requests get 503."""
    req = {"history": ["item3", "item8"], "top_n": 4}
    with TestClient(create_app(settings_for(bundle_dir, warmup=False))) as c:
        in_thread = c.post("/v1/recommend", json=req).json()
    s = settings_for(bundle_dir, engine_process=True, admin_token=TOKEN)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = c.post("/v1/recommend", json=req).json()
        assert [i["item_id"] for i in r["items"]] == [i["item_id"] for i in in_thread["items"]]
        assert c.post("/v1/score", json={"history": ["item3"], "candidates": ["item4"]}).status_code == 200
        top = r["items"][0]["item_id"]
        c.post("/v1/admin/mask", json={"item_ids": [top]}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert top not in [i["item_id"] for i in c.post("/v1/recommend", json=req).json()["items"]]
        assert c.get("/v1/model").json()["num_items"] == 300 and c.get("/healthz").status_code == 200
        proc = c.app.state.runtime.engine._proc
        proc.kill()
        proc.join(5)
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, "not_ready")
        assert_error(c.post("/v1/recommend", json=req), 503, "engine_unavailable")
    broken = make_bundle(tmp_path / "broken", n_items=40)
    (broken / "sid_map.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StartupError, match="refusing to start.*sid_map"):
        with TestClient(create_app(settings_for(broken, engine_process=True))):
            pass
