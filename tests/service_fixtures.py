"""Shared fixtures of the service tests: a small random-weight bundle, apps, a Redis namespace.

The bundle is the real format (model.bundle.save_bundle) over ~300 items with unique SIDs in a
(8, 8, 8, 4) layout; weights are drawn wide enough that scores are not all near-ties, so
batched and one-by-one answers can be compared item by item.
Import the fixtures by name in a test module: `from service_fixtures import bundle_dir, ...`.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from sidrec.model.bundle import save_bundle
from sidrec.model.config import ModelConfig, SIDLayout
from sidrec.model.transformer import SIDTransformer
from sidrec.service.app import create_app
from sidrec.service.settings import Settings

REDIS_URL = os.environ.get("SIDREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LAYOUT = (8, 8, 8, 4)


def random_model(layout: tuple[int, ...], g: torch.Generator, std: float = 0.6) -> SIDTransformer:
    """A 1+1-layer SID transformer with weights drawn wide enough that scores are not near-ties."""
    cfg = ModelConfig(SIDLayout(layout), d_model=32, n_heads=2, d_head=16, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    model = SIDTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=g)
    return model


def make_bundle(path: Path, n_items: int = 300, seed: int = 0, prefix: str = "item") -> Path:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = random_model(LAYOUT, g)
    cells = torch.randperm(LAYOUT[0] * LAYOUT[1] * LAYOUT[2], generator=g)[:n_items]
    dedup = torch.randint(0, LAYOUT[3], (n_items,), generator=g)
    sid_map = torch.stack([cells // 64, (cells // 8) % 8, cells % 8, dedup])  # (L, N), unique rows
    ids = [f"{prefix}{i}" for i in range(n_items)]
    return save_bundle(path, model, sid_map, ids, metrics={"test": {"R@10": 0.1}}, overwrite=True)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("svc") / "bundle")


@pytest.fixture(scope="session")
def bundle_dir_b(tmp_path_factory) -> Path:
    """A second bundle (other weights, SIDs and ids, other version) for two-version tests."""
    return make_bundle(tmp_path_factory.mktemp("svc") / "bundle_b", n_items=200, seed=1, prefix="b")


def settings_for(bundle: Path, **kw) -> Settings:
    base = dict(bundle_path=str(bundle), max_beam_width=256, default_beam_width=32, num_threads=1,
                mask_sync_interval_s=3600.0, engine_process=False)
    base.update(kw)
    return Settings(**base)


@asynccontextmanager
async def running_app(settings: Settings):
    """The real app with its lifespan, and an httpx client over ASGI (no sockets)."""
    import httpx

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidrec.test") as client:
            yield app, client


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def redis_ns():
    """A unique key namespace in the test Redis DB, deleted afterwards. Fails if Redis is down."""
    import redis

    from sidrec.service.index_store import drop_namespace

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({e}); start one or set SIDREC_TEST_REDIS_URL")
    ns = f"sidrec-test-{uuid.uuid4().hex[:10]}"
    try:
        yield client, ns
    finally:
        drop_namespace(client, ns)
        client.close()


def same_ranking(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    """Equal item lists, allowing two items to swap only where their scores tie within tol."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if abs(x["score"] - y["score"]) > tol:
            return False
        if x["item_id"] != y["item_id"]:
            sx = {i["item_id"] for i in a if abs(i["score"] - x["score"]) <= tol}
            if y["item_id"] not in sx:
                return False
    return True
