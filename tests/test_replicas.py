"""The replica registry: each Redis-backed replica records the version it serves; a version in use
cannot be dropped without --force; a stopped replica's record goes away."""
from __future__ import annotations

import asyncio
import json

import pytest
from service_fixtures import REDIS_URL, bundle_dir, bundle_dir_b, redis_ns, run, running_app, settings_for  # noqa: F401

from sidrec.service import index_store as store
from sidrec.service.cli import main as cli_main
from sidrec.service.replicas import list_replicas, serving_versions

pytestmark = pytest.mark.redis


def test_served_version_is_recorded_and_protected(bundle_dir, bundle_dir_b, redis_ns, capsys, monkeypatch):
    client, ns = redis_ns
    base = ["--redis-url", REDIS_URL, "--namespace", ns]
    assert cli_main(["index", "load", str(bundle_dir_b), *base]) == 0  # a second version, current at first
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"]
    monkeypatch.setenv("SIDREC_REPLICA_ID", "replica-a")

    async def scenario():
        s = settings_for(bundle_dir, redis_url=REDIS_URL, redis_namespace=ns, warmup=False)
        async with running_app(s) as (app, _):
            served = app.state.runtime.engine.version
            for _ in range(50):  # the first beat is written right after startup
                if list_replicas(client, ns):
                    break
                await asyncio.sleep(0.02)
            during = list_replicas(client, ns), serving_versions(client, ns)
            with pytest.raises(store.IndexStoreError, match="still served by 1 replica.*replica-a"):
                store.drop_version(client, ns, served)
            refused = cli_main(["index", "drop", served, *base])
        return served, during, refused, list_replicas(client, ns)

    served, (replicas, versions), refused, after = run(scenario())
    assert served != other
    assert replicas["replica-a"]["version"] == served and replicas["replica-a"]["pid"] > 0
    assert versions == {served: ["replica-a"]}
    assert refused == 2 and "still served" in capsys.readouterr().err
    assert after == {}  # a replica that stops deletes its record (and would expire anyway)
    assert cli_main(["index", "drop", served, *base]) == 0  # nobody serves it now, and it is not current
    assert json.loads(capsys.readouterr().out)["dropped"] == served
    assert cli_main(["index", "replicas", *base]) == 0
    assert json.loads(capsys.readouterr().out) == {"namespace": ns, "replicas": {}, "versions": {}}
