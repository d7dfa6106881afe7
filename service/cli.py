"""The online half of the `sidrec` command (`sidrec.cli` dispatches here): `sidrec serve`,
`sidrec index load|list|activate|drop|replicas`.

`serve` runs uvicorn (one process, or `--workers N` processes that each build the app from the
SIDREC_* environment); flags override the environment. `index` manages inverse-index versions
in Redis (see `service.index_store`): load a bundle's SID -> item-id map (pipelined, idempotent,
namespaced by bundle version, atomic switch of `{ns}:current`), list, activate, drop.
Exit codes: 0 ok, 2 bad input (broken bundle, refused operation), 3 Redis unreachable.
This module holds no request logic.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from sidrec.service.settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidrec", description="sidrec online service")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--bundle", dest="bundle_path", help="bundle directory (SIDREC_BUNDLE_PATH)")
    s.add_argument("--host", help="bind address (SIDREC_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (SIDREC_PORT, default 8000)")
    s.add_argument("--workers", type=int, help="worker processes (SIDREC_WORKERS, default 1)")
    s.add_argument("--redis-url", dest="redis_url", help="use the Redis inverse index (SIDREC_REDIS_URL)")
    s.add_argument("--device", help="cpu | cuda (SIDREC_DEVICE)")
    s.add_argument("--num-threads", dest="num_threads", type=int, help="torch threads per worker")
    s.add_argument("--no-batching", dest="batching", action="store_const", const=False, help="one request per engine call")
    s.add_argument("--log-level", dest="log_level", help="uvicorn log level")

    i = sub.add_parser("index", help="manage inverse-index versions in Redis")
    isub = i.add_subparsers(dest="index_command", required=True)
    for name, help_ in (("load", "load a bundle's SID map"), ("list", "list loaded versions"),
                        ("activate", "point the current version at VERSION"), ("drop", "delete one version"),
                        ("replicas", "list live replicas and the version each serves")):
        c = isub.add_parser(name, help=help_)
        c.add_argument("--redis-url", dest="redis_url", help="Redis URL (default SIDREC_REDIS_URL)")
        c.add_argument("--namespace", help="key namespace (default SIDREC_REDIS_NAMESPACE or 'sidrec')")
        if name == "load":
            c.add_argument("bundle", nargs="?", help="bundle directory")
            c.add_argument("--bundle", dest="bundle_opt", help="bundle directory (same as the positional)")
            c.add_argument("--no-activate", dest="activate", action="store_false",
                           help="load without switching the current version")
            c.add_argument("--force", action="store_true", help="replace a same-named version with other content")
        if name in ("activate", "drop"):
            c.add_argument("version")
        if name == "drop":
            c.add_argument("--force", action="store_true", help="allow dropping the current version")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"sidrec: {msg}", file=sys.stderr)
    return code


def serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except Exception as e:  # pydantic ValidationError: name the bad setting
        return _fail(f"invalid settings: {e}")
    from sidrec.model.bundle import BundleError, read_config

    try:
        read_config(settings.bundle_path)
    except BundleError as e:
        return _fail(f"refusing to start: {e}")
    import uvicorn

    from sidrec.service.app import configure_logging

    configure_logging(settings.log_level)
    if settings.workers > 1:
        # Worker processes build the app from the environment: hand the overrides down.
        for k, v in overrides.items():
            os.environ[f"SIDREC_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
        from sidrec.service.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(settings.workers)  # /metrics then adds every worker's series up
        uvicorn.run("sidrec.service.app:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level, timeout_graceful_shutdown=10)
        return 0
    from sidrec.service.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
    return 0


def index(args: argparse.Namespace) -> int:
    import redis

    from sidrec.model.bundle import BundleError
    from sidrec.service import index_store as store

    env = Settings(bundle_path=".")  # only the redis_* fields are used here
    url = args.redis_url or env.redis_url
    ns = args.namespace or env.redis_namespace
    if not url:
        return _fail("no Redis configured: pass --redis-url or set SIDREC_REDIS_URL")
    client = redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        return _fail(f"Redis is unreachable ({type(e).__name__}): check --redis-url", 3)
    try:
        if args.index_command == "load":
            bundle = args.bundle or args.bundle_opt
            if not bundle:
                return _fail("index load needs a bundle directory")
            version, sid_map, item_ids, cards = store.read_bundle_index(bundle)
            rep = store.load_version(client, ns, version, sid_map, item_ids, cards, activate=args.activate,
                                     force=args.force)
            print(json.dumps(rep.to_dict()))
        elif args.index_command == "replicas":
            from sidrec.service.replicas import list_replicas, serving_versions

            print(json.dumps({"namespace": ns, "replicas": list_replicas(client, ns),
                              "versions": serving_versions(client, ns)}, indent=2))
        elif args.index_command == "list":
            print(json.dumps(store.list_versions(client, ns), indent=2))
        elif args.index_command == "activate":
            prev = store.activate_version(client, ns, args.version)
            print(json.dumps({"namespace": ns, "current": args.version, "previous": prev}))
        elif args.index_command == "drop":
            n = store.drop_version(client, ns, args.version, force=args.force)
            print(json.dumps({"namespace": ns, "dropped": args.version, "keys_deleted": n}))
    except (BundleError, store.IndexStoreError) as e:
        return _fail(str(e))
    finally:
        client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return index(args)


if __name__ == "__main__":
    sys.exit(main())
