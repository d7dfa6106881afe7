"""Bulk-ingest throughput: `sidrec items add` against a running replica, split into embedding
(all-MiniLM-L6-v2 + quantizing, in the server) and insertion (the atomic Redis claim + log write,
and the replica's engine apply).

    .venv/bin/python benchmarks/catalogue_ingest.py [--items 10000] [--base 2000]

Builds a synthetic bundle whose codebooks live in MiniLM's space (`--base` product-like texts
embedded with the real model, quantized by the pipeline's RQ-KMeans; layout 64 x 64 x 64 + a
de-duplication digit of --dedup codes), serves it from one replica against Redis db 15 (a fresh
namespace, dropped at the end), writes `--items` new items to NDJSON and ingests them with the
CLI's own `ingest`. Prints a table, then one JSON line; `extrapolated_100k_s` scales the measured
rates to 100k items (linear: the store's claim is O(1) per item; an engine whose insert cost
grows with the catalogue would make it optimistic - see `insert_items_per_s` by half).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "loadtests"), str(ROOT / "tests")]
REDIS_URL = os.environ.get("SIDREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TOKEN = "ingest-token"
NOUNS = ["lipstick", "shampoo", "sunscreen", "perfume", "nail polish", "razor", "mascara", "toothpaste", "serum",
         "moisturizer", "cleanser", "toner", "eyeshadow", "blush", "foundation", "conditioner"]
ADJ = ["matte", "glossy", "organic", "vegan", "hydrating", "long-lasting", "travel size", "sensitive", "floral",
       "unscented", "mint", "vanilla", "spf 50", "waterproof", "volumizing", "repairing"]


def product_text(rng: random.Random) -> str:
    return (f"{rng.choice(ADJ).title()} {rng.choice(ADJ)} {rng.choice(NOUNS)}, {rng.randrange(5, 500)} ml, "
            f"line {rng.randrange(10_000):04d}. Category: Beauty > {rng.choice(NOUNS).title()}. "
            f"Brand: B{rng.randrange(500)}. Price: {rng.randrange(3, 90)}.99")


def build_bundle(path: Path, n_base: int, seed: int = 0, dedup: int = 1024) -> Path:
    from sidrec.model.bundle import save_bundle
    from sidrec.model.config import ModelConfig, SIDLayout
    from sidrec.model.sid_assign import add_dedup_digit
    from sidrec.model.text_embed import TextEmbedder
    from sidrec.model.transformer import SIDTransformer
    from sidrec.training.quantize import rq_kmeans

    rng = random.Random(seed)
    X = TextEmbedder().embed([product_text(rng) for _ in range(n_base)])
    rq = rq_kmeans(X, 3, 64, balanced=False, seed=seed)  # the pipeline's quantizer, fit on the base texts
    books, codes = [np.asarray(b, np.float32) for b in rq.codebooks], rq.codes
    sid_map, card = add_dedup_digit(codes)
    cfg = ModelConfig(SIDLayout((64, 64, 64, max(dedup, card))), d_model=32, n_heads=2, d_head=16, d_ff=64,
                      n_enc_layers=1, n_dec_layers=1)
    torch.manual_seed(seed)
    return save_bundle(path, SIDTransformer(cfg), torch.from_numpy(sid_map), [f"base{i}" for i in range(n_base)],
                       codebooks={f"codebook_{k}": torch.from_numpy(np.asarray(b, np.float32))
                                  for k, b in enumerate(books)},
                       extra_config={"sid": {"method": "rq_kmeans"}}, overwrite=True)


async def serve(bundle: Path, ns: str):
    import httpx
    from catalogue_drill import _LAUNCH, free_port, wait_ready

    port = free_port()
    env = dict(os.environ, SIDREC_BUNDLE_PATH=str(bundle), SIDREC_REDIS_URL=REDIS_URL, SIDREC_REDIS_NAMESPACE=ns,
               SIDREC_ADMIN_TOKEN=TOKEN, SIDREC_NUM_THREADS="2", SIDREC_ENGINE_PROCESS="true",
               SIDREC_LOG_LEVEL="warning", SIDREC_CATALOGUE_APPLY_WAIT_S="30")
    code = _LAUNCH.format(root=str(ROOT), tests=str(ROOT / "tests"), port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=10) as c:
        await wait_ready(c, url, proc)
    return proc, url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--base", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--dedup", type=int, default=1024,
                    help="de-duplication codes per prefix (synthetic texts crowd some prefixes: at 32, 100k "
                         "items ran out after 3,456, which the service refuses with 409 sid_space_full)")
    args = ap.parse_args(argv)
    import redis

    from sidrec.service.index_store import drop_namespace
    from sidrec.service.items_cli import ingest

    tmp = Path(tempfile.mkdtemp(prefix="sidrec-ingest-"))
    bundle = build_bundle(tmp / "bundle", args.base, dedup=args.dedup)
    rng = random.Random(1)
    with open(tmp / "items.jsonl", "w") as f:
        for i in range(args.items):
            f.write(json.dumps({"item_id": f"new{i}", "text": product_text(rng),
                                "attributes": {"brand": [f"B{rng.randrange(500)}"]}}) + "\n")
    ns = f"sidrec-ingest-{uuid.uuid4().hex[:8]}"
    proc, url = asyncio.run(serve(bundle, ns))
    try:
        rep = ingest(str(tmp / "items.jsonl"), url, TOKEN, args.batch)
    finally:
        proc.terminate()
        proc.wait(20)
        client = redis.Redis.from_url(REDIS_URL)
        drop_namespace(client, ns)
        client.close()
    rep.update(base_items=args.base,
               extrapolated_100k_s=round(100_000 * rep["wall_s"] / max(rep["items"], 1), 1))
    for k, v in rep.items():
        print(f"{k:<24} {v}")
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
