"""Fuzz drill: schemathesis-generated requests against the real app, every operation of its schema.

The app is the real one (`create_app`, lifespan, batcher, index) on a bundle, driven in process
through schemathesis' ASGI transport. Every operation the app's OpenAPI schema lists is fuzzed,
admin and catalogue writes included (new endpoints are picked up with no change here), with
schema-valid (positive) and schema-violating (negative) cases, each sent with no token, the
admin token, or a wrong token. What counts as a failure:

- any 5xx;
- a 4xx whose body is not the one error shape `{"error": {"code", "message", "details"}}`
  (service/errors.py): a JSON object with exactly that key, a non-empty string code and message;
- a 2xx whose body does not match the operation's response schema (positive cases).

Generation is seeded (hypothesis), so a run is reproducible; `--requests` sets the total.
Writes a JSON report (atomically) and prints a small table, then one JSON line last.
tests/test_fuzz.py runs a short seeded form of it in CI. This is not a load test (one request at
a time); it holds no server of its own.

    python loadtests/fuzz.py --requests 10000 --seed 0 --out runs/fuzz-report.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AUTH_MODES = ("none", "admin", "wrong")
MAX_EXAMPLES_KEPT = 20


@dataclass
class FuzzReport:
    seed: int
    requested: int
    requests: int = 0
    seconds: float = 0.0
    by_status: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    by_auth: Counter = field(default_factory=Counter)
    server_errors: int = 0
    bad_error_bodies: int = 0
    schema_mismatches: int = 0
    examples: list[dict] = field(default_factory=list)  # the first failures, for a human to read
    skipped: list[str] = field(default_factory=list)  # (operation, mode) pairs nothing could be drawn for

    @property
    def failures(self) -> int:
        return self.server_errors + self.bad_error_bodies + self.schema_mismatches

    def summary(self) -> dict[str, Any]:
        return {"drill": "fuzz", "seed": self.seed, "requests": self.requests, "requested": self.requested,
                "seconds": round(self.seconds, 1), "operations": len(self.by_operation),
                "status_5xx": self.server_errors, "bad_error_bodies": self.bad_error_bodies,
                "schema_mismatches": self.schema_mismatches,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "by_auth": dict(self.by_auth), "ok": self.failures == 0 and self.requests >= self.requested}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(self.summary())
        d["by_operation"] = dict(sorted(self.by_operation.items()))
        return d


def error_body_problem(status: int, content_type: str, content: bytes) -> str | None:
    """Why a 4xx/5xx body is not the one error shape, or None when it is."""
    if not content_type.startswith("application/json"):
        return f"content-type {content_type!r}, not application/json"
    try:
        body = json.loads(content)
    except ValueError:
        return "body is not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return "body is not {\"error\": {...}}"
    err = body["error"]
    if set(err) != {"code", "message", "details"}:
        return f"error keys {sorted(err)}, not code/message/details"
    if not (isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str) and err["message"]):
        return "error code/message missing or not strings"
    if "Traceback" in err["message"]:
        return "error message holds a traceback"
    return None


def _content_type(response) -> str:
    for k, v in response.headers.items():  # schemathesis: name -> list of values
        if k.lower() == "content-type":
            return v[0] if isinstance(v, list) else str(v)
    return ""


def _headers(auth: str, token: str) -> dict[str, str]:
    if auth == "admin":
        return {"Authorization": f"Bearer {token}"}
    if auth == "wrong":
        return {"Authorization": "Bearer not-the-token"}
    return {}


def _record(report: FuzzReport, label: str, case, auth: str, response, mode: str) -> None:
    from schemathesis.specs.openapi.checks import response_schema_conformance

    status = response.status_code
    report.requests += 1
    report.by_status[status] += 1
    report.by_operation[label] += 1
    report.by_auth[auth] += 1
    problem = None
    if status >= 500:
        report.server_errors += 1
        problem = "5xx"
    if status >= 400:
        bad = error_body_problem(status, _content_type(response), response.content)
        if bad:
            report.bad_error_bodies += 1
            problem = f"{problem + '; ' if problem else ''}{bad}"
    elif mode == "positive" and label.split(" ", 1)[1] != "/metrics":
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except Exception as e:  # schemathesis' failure (group): the body does not match the schema
            report.schema_mismatches += 1
            problem = f"response schema: {str(e).strip()[:300]}"
    if problem and len(report.examples) < MAX_EXAMPLES_KEPT:
        report.examples.append({"operation": label, "mode": mode, "auth": auth, "status": status,
                                "problem": problem, "body": response.content[:300].decode("utf-8", "replace"),
                                "curl": case.as_curl_command()[:600]})


ID_FIELDS = {"history", "candidates", "item_ids", "exclude", "exclude_items", "item_id"}


def with_known_ids(value: Any, known: list[str], rnd, key: str | None = None) -> Any:
    """Replace the item ids of a body (lists of strings under ID_FIELDS, at any depth) with ids the
    catalogue knows: random strings almost never name an item, so without this the engine path
    behind `history` would be reached only through 422s."""
    if isinstance(value, dict):
        return {k: with_known_ids(v, known, rnd, k) for k, v in value.items()}
    if isinstance(value, list):
        if key in ID_FIELDS and all(isinstance(x, str) for x in value):
            return [rnd.choice(known) for _ in value]
        return [with_known_ids(v, known, rnd) for v in value]
    if key in ID_FIELDS and isinstance(value, str):
        return rnd.choice(known)
    return value


def _fuzz_one(report: FuzzReport, label: str, mode: str, strategy, token: str, bar, quota: int, seed: int,
              known_ids: list[str]):
    """A hypothesis test drawing `quota` cases of one operation and mode, each with an auth mode
    (and, for positive cases, half the time with item ids the catalogue knows)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    @hyp_seed(seed)
    @settings(max_examples=quota, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy, auth=st.sampled_from(AUTH_MODES), known=st.booleans(), rnd=st.randoms(use_true_random=False))
    def one(case, auth, known, rnd) -> None:
        if case.headers:  # the drill decides the token; never one drawn from the schema
            case.headers.pop("Authorization", None)
            case.headers.pop("authorization", None)
        if known and known_ids and mode == "positive" and isinstance(case.body, dict):
            case.body = with_known_ids(case.body, known_ids, rnd)
        response = case.call(headers=_headers(auth, token))
        _record(report, label, case, auth, response, mode)
        if bar is not None:
            bar.update(1)

    return one


def run_fuzz(app, n_requests: int, seed: int, token: str, modes=("positive", "negative"),
             progress: bool = False, known_ids: list[str] | None = None) -> FuzzReport:
    """Fuzz every operation of `app`'s schema until `n_requests` requests were sent."""
    import schemathesis
    from hypothesis.errors import HypothesisException
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan once
    ops = [r.ok() for r in schema.get_all_operations()]
    pairs = [(op, m) for op in ops for m in modes]
    report = FuzzReport(seed=seed, requested=n_requests)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n_requests, unit="req", desc="fuzz", mininterval=1 if sys.stderr.isatty() else 30)
        except ImportError:
            pass
    t0 = time.perf_counter()
    exhausted: set[tuple[str, str]] = set()
    for rnd in range(50):
        remaining = n_requests - report.requests
        live = [(op, m) for op, m in pairs if (f"{op.method.upper()} {op.path}", m) not in exhausted]
        if remaining <= 0 or not live:
            break
        quota = math.ceil(remaining / len(live))
        for op, mode in live:
            label = f"{op.method.upper()} {op.path}"
            before = report.requests
            strategy = op.as_strategy(generation_mode=GenerationMode(mode))

            one = _fuzz_one(report, label, mode, strategy, token, bar, quota, seed * 1000 + rnd, known_ids or [])
            try:
                one()
            except HypothesisException as e:  # e.g. nothing negative can be drawn for a body-less GET
                report.skipped.append(f"{label} {mode}: {type(e).__name__}: {str(e)[:200]}")
                exhausted.add((label, mode))
                continue
            if report.requests - before < quota:  # hypothesis ran out of distinct cases to draw
                exhausted.add((label, mode))
            if report.requests >= n_requests:
                break
    report.seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return report


def small_bundle(path: Path, n_items: int = 200, seed: int = 0) -> Path:
    """A random-weight bundle in the real format (the drill tests the service, not the model)."""
    import torch

    from sidrec.model.bundle import save_bundle
    from sidrec.model.config import ModelConfig, SIDLayout
    from sidrec.model.transformer import SIDTransformer

    layout = (8, 8, 8, 4)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(SIDLayout(layout), d_model=32, n_heads=2, d_head=16, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    model = SIDTransformer(cfg)
    cells = torch.randperm(layout[0] * layout[1] * layout[2], generator=g)[:n_items]
    dedup = torch.randint(0, layout[3], (n_items,), generator=g)
    sid_map = torch.stack([cells // 64, (cells // 8) % 8, cells % 8, dedup])  # (L, N), unique rows
    return save_bundle(path, model, sid_map, [f"item{i}" for i in range(n_items)], overwrite=True)


def fuzz_settings(bundle: Path, token: str, redis_url: str | None = None, max_beam_width: int = 64):
    """The service as deployed, with smaller beam limits so 10k generated requests fit minutes."""
    from sidrec.service.settings import Settings

    return Settings(bundle_path=str(bundle), admin_token=token, engine_process=False, num_threads=1,
                    max_beam_width=max_beam_width, default_beam_width=min(16, max_beam_width),
                    max_batch_requests=8, redis_url=redis_url, mask_sync_interval_s=3600.0)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="generated requests in all (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", help="bundle directory (default: a small random-weight bundle in a temp dir)")
    p.add_argument("--redis-url", help="use the Redis inverse index (default: in-process)")
    p.add_argument("--max-beam-width", type=int, default=64, help="the service's beam limit during the drill")
    p.add_argument("--out", default="runs/fuzz-report.json", help="where to write the JSON report")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be >= 1")
    from sidrec.service.app import create_app

    token = "fuzz-admin-" + os.urandom(6).hex()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else small_bundle(Path(tmp) / "bundle")
        app = create_app(fuzz_settings(bundle, token, args.redis_url, args.max_beam_width))
        known = json.loads((bundle / "item_ids.json").read_text())
        report = run_fuzz(app, args.requests, args.seed, token, progress=True, known_ids=known)
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()
    write_json(Path(args.out), report.to_dict())
    print(f"{'operation':<36}{'requests':>10}")
    for label, n in sorted(report.by_operation.items()):
        print(f"{label:<36}{n:>10}")
    print(f"status: {dict(sorted(report.by_status.items()))}  5xx: {report.server_errors}  "
          f"bad error bodies: {report.bad_error_bodies}  schema mismatches: {report.schema_mismatches}")
    for ex in report.examples[:5]:
        print(f"  e.g. {ex['operation']} ({ex['mode']}, auth {ex['auth']}): {ex['status']} {ex['problem']}")
    print(json.dumps({**report.summary(), "report": args.out}))
    return 0 if report.summary()["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
