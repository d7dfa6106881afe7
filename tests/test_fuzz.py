"""The fuzz drill's short, seeded form (loadtests/fuzz.py): a few hundred schemathesis requests at
the real app, in process over ASGI, on every operation its schema lists, with and without the
admin token. Zero 5xx and every 4xx in the one error body; and the drill itself is shown an app
that fails, so a drill that reports nothing cannot pass.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
import fuzz  # noqa: E402

sys.path.pop(0)

from service_fixtures import bundle_dir  # noqa: E402,F401

TOKEN = "fuzz-test-token"


@pytest.mark.slow
def test_seeded_fuzz_finds_no_server_errors_and_one_error_shape(bundle_dir):  # noqa: F811
    from schemathesis.python import asgi

    from sidrec.service.app import create_app

    app = create_app(fuzz.fuzz_settings(bundle_dir, TOKEN, max_beam_width=32))
    known = json.loads((bundle_dir / "item_ids.json").read_text())
    try:
        report = fuzz.run_fuzz(app, 300, seed=1234, token=TOKEN, known_ids=known)
    finally:
        asgi.shutdown_lifespans()
    s = report.summary()
    assert s["status_5xx"] == 0 and s["bad_error_bodies"] == 0 and s["schema_mismatches"] == 0, report.examples
    assert report.requests >= 300
    operations = {f"{m.upper()} {p}" for p, item in app.openapi()["paths"].items() for m in item}
    assert set(report.by_operation) == operations  # every operation the schema exposes, new ones too
    assert set(report.by_auth) == set(fuzz.AUTH_MODES)
    assert report.by_status[200] > 0 and report.by_status[401] > 0 and report.by_status[422] > 0


def failing_app():
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()

    @app.post("/thing")
    async def thing(n: int = Body(embed=True, ge=0, le=10)):
        if n % 3 == 0:
            return PlainTextResponse("boom", status_code=500)
        if n % 3 == 1:
            return JSONResponse({"detail": "nope"}, status_code=400)
        return {"ok": True}

    return app


def test_the_drill_reports_server_errors_and_other_error_bodies():
    """A bare FastAPI app whose one route fails (500 in a plain-text body) or answers 400 in a body
    of its own shape, for some inputs: the drill counts both."""
    from schemathesis.python import asgi

    app = failing_app()
    try:
        report = fuzz.run_fuzz(app, 40, seed=7, token=TOKEN, modes=("positive",))
    finally:
        asgi.shutdown_lifespans()
    assert report.server_errors > 0 and report.bad_error_bodies > 0
    assert not report.summary()["ok"]
    assert any(e["status"] == 500 for e in report.examples)


@pytest.mark.parametrize("content_type,body,problem", [
    ("application/json", b'{"error": {"code": "x", "message": "m", "details": null}}', None),
    ("text/plain", b"Internal Server Error", "content-type"),
    ("application/json", b'{"detail": "Not Found"}', "not {\"error\""),
    ("application/json", b'{"error": {"code": "x", "message": "m"}}', "code/message/details"),
    ("application/json", b'{"error": {"code": "", "message": "m", "details": 1}}', "missing or not strings"),
    ("application/json", b"{not json", "not JSON"),
])
def test_error_body_shape_check(content_type, body, problem):
    got = fuzz.error_body_problem(422, content_type, body)
    assert (got is None) if problem is None else (problem in got)
