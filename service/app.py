"""The FastAPI app: `create_app(settings)` factory, lifespan, and thin route handlers.

The lifespan loads the bundle, opens the inverse index, warms the engine up and keeps a
`ServiceRuntime` on `app.state.runtime`; on shutdown it drains the batcher and closes the index.
A broken bundle or an unreachable Redis makes startup fail with a message naming the cause.
Handlers only parse, delegate to the runtime and return; errors share one body shape
(`service.errors`). Run it with `sidrec serve` (uvicorn); with several workers uvicorn
calls `create_app()` with no argument, which reads `Settings()` from the SIDREC_* environment.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sidrec.service import schemas as S
from sidrec.service.errors import APIError, error_response, install_error_handlers
from sidrec.service.metrics import CONTENT_TYPE, ServiceMetrics
from sidrec.service.middleware import ServiceMiddleware
from sidrec.service.runtime import ServiceRuntime, StartupError
from sidrec.service.settings import Settings

log = logging.getLogger("sidrec.service")
router = APIRouter()
_bearer = HTTPBearer(auto_error=False)


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in its thread pool, one
# thread hop (and GIL hand-over) per request for what is an attribute read.
async def runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


async def admin(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    settings: Settings = request.app.state.settings
    if not settings.admin_enabled:
        raise APIError(403, "admin_disabled", "admin endpoints are disabled; set SIDREC_ADMIN_TOKEN to enable them")
    assert settings.admin_token is not None
    token = settings.admin_token.get_secret_value()
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise APIError(401, "unauthorized", "a valid admin bearer token is required (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})


@router.post("/v1/recommend", response_model=S.RecommendResponse, tags=["recommend"])
async def recommend(body: S.RecommendRequest, rt: ServiceRuntime = Depends(runtime)) -> S.RecommendResponse:
    """Top-N items for one user's history (external ids, oldest first)."""
    return await rt.recommend(body)


@router.post("/v1/recommend/batch", response_model=S.BatchRecommendResponse, tags=["recommend"])
async def recommend_batch(body: S.BatchRecommendRequest,
                          rt: ServiceRuntime = Depends(runtime)) -> S.BatchRecommendResponse:
    """Many users in one call, run as engine batches; a bad user gets an error object in its slot."""
    return await rt.recommend_batch(body)


@router.post("/v1/score", response_model=S.ScoreResponse, tags=["recommend"])
async def score(body: S.ScoreRequest, rt: ServiceRuntime = Depends(runtime)) -> S.ScoreResponse:
    """Log-likelihood of each candidate item as the user's next item (ranking mode)."""
    return await rt.score(body)


@router.get("/v1/model", response_model=S.ModelInfo, tags=["model"])
async def model_info(rt: ServiceRuntime = Depends(runtime)) -> S.ModelInfo:
    """Bundle metadata: version, catalogue size, SID layout, evaluation metrics, limits."""
    return rt.model_info()


@router.post("/v1/admin/mask", response_model=S.MaskResponse, tags=["admin"], dependencies=[Depends(admin)])
async def mask_items(body: S.MaskRequest, rt: ServiceRuntime = Depends(runtime)) -> S.MaskResponse:
    """Mask (masked=true) or unmask items: deleted or out-of-stock items are never recommended."""
    return await rt.set_masked(body)


@router.get("/v1/admin/mask", response_model=S.MaskedList, tags=["admin"], dependencies=[Depends(admin)])
async def masked_items(rt: ServiceRuntime = Depends(runtime)) -> S.MaskedList:
    return S.MaskedList(num_masked=len(rt.masked), item_ids=sorted(rt.masked)[:1000])


@router.post("/v1/admin/model/load", response_model=S.ModelSwitchResponse, tags=["admin"],
             dependencies=[Depends(admin)])
async def load_model(body: S.ModelLoadRequest, rt: ServiceRuntime = Depends(runtime)) -> S.ModelSwitchResponse:
    """Load a bundle version beside the serving one, warm it, re-quantize the run-time catalogue
    under its codebooks, and switch; requests in flight finish on the model they started on."""
    return await rt.lifecycle.load(body.bundle_path)


@router.post("/v1/admin/model/rollback", response_model=S.ModelSwitchResponse, tags=["admin"],
             dependencies=[Depends(admin)])
async def rollback_model(rt: ServiceRuntime = Depends(runtime)) -> S.ModelSwitchResponse:
    """Switch back to the version served before the last switch (kept loaded: no restart, no load)."""
    rt.take_slot()
    return await rt.lifecycle.rollback()


@router.get("/v1/admin/model", response_model=S.ModelVersions, tags=["admin"], dependencies=[Depends(admin)])
async def model_versions(rt: ServiceRuntime = Depends(runtime)) -> S.ModelVersions:
    """The serving version, the one kept for rollback, and the last switches."""
    rt.take_slot()
    return rt.lifecycle.describe()


@router.post("/v1/items", response_model=S.ItemsWriteResponse, tags=["catalogue"], dependencies=[Depends(admin)])
async def upsert_items(body: S.ItemsWriteRequest, rt: ServiceRuntime = Depends(runtime)) -> S.ItemsWriteResponse:
    """Add or update up to 1,000 items (id, text, attributes): new text gets a semantic id from the
    bundle's embedding model and codebooks; served by every replica within a second, no restart."""
    return await rt.require_items().upsert(body)


@router.get("/v1/items/{item_id}", response_model=S.ItemInfo, tags=["catalogue"])
async def get_item(item_id: str, rt: ServiceRuntime = Depends(runtime)) -> S.ItemInfo:
    """One item as the catalogue knows it: SID, text, attributes, deleted, from the bundle or added."""
    return await rt.require_items().get(item_id)


@router.delete("/v1/items/{item_id}", response_model=S.ItemsDeleteResponse, tags=["catalogue"],
               dependencies=[Depends(admin)])
async def delete_item(item_id: str, rt: ServiceRuntime = Depends(runtime)) -> S.ItemsDeleteResponse:
    """Delete an item: once this returns, no replica's response contains it."""
    return await rt.require_items().set_deleted([item_id], True)


@router.post("/v1/items/delete", response_model=S.ItemsDeleteResponse, tags=["catalogue"],
             dependencies=[Depends(admin)])
async def delete_items(body: S.ItemIdsRequest, rt: ServiceRuntime = Depends(runtime)) -> S.ItemsDeleteResponse:
    """Delete up to 1,000 items at once."""
    return await rt.require_items().set_deleted(body.item_ids, True)


@router.post("/v1/items/restore", response_model=S.ItemsDeleteResponse, tags=["catalogue"],
             dependencies=[Depends(admin)])
async def restore_items(body: S.ItemIdsRequest, rt: ServiceRuntime = Depends(runtime)) -> S.ItemsDeleteResponse:
    """Bring deleted items back (same SID)."""
    return await rt.require_items().set_deleted(body.item_ids, False)


@router.get("/healthz", response_model=S.HealthResponse, tags=["ops"],
            responses={503: {"description": "the engine's restarts keep failing (error body)"}})
async def healthz(rt: ServiceRuntime = Depends(runtime)):
    """Liveness: the process answers and its engine serves or is being restarted by the watchdog."""
    if not rt.alive():
        return error_response(503, "engine_unavailable", "the engine process died and could not be restarted; "
                              "replace this replica")
    return S.HealthResponse(status="ok")


@router.get("/readyz", response_model=S.ReadyResponse, tags=["ops"],
            responses={503: {"description": "not ready (error body)"}})
async def readyz(rt: ServiceRuntime = Depends(runtime)):
    """Readiness: model loaded, warmed up, and the inverse index reachable."""
    state = await rt.readiness()
    if state["status"] != "ready":
        missing = [k for k in ("model_loaded", "warmed", "index_reachable", "engine_healthy", "catalogue_caught_up")
                   if not state[k]]
        return error_response(503, "not_ready", "not ready: " + (", ".join(missing) or "shutting down"), state,
                              {"Retry-After": "1"})
    return JSONResponse(state)


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def configure_logging(level: str) -> None:
    """Send the service's own log lines (startup, masks, unexpected errors) to stderr."""
    logger = logging.getLogger("sidrec")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. `settings=None` reads SIDREC_* (the path uvicorn's --workers takes)."""
    if settings is None:  # a uvicorn worker process: nothing configured our logger yet
        settings = Settings()
        configure_logging(settings.log_level)
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = ServiceRuntime(settings, metrics)
        app.state.runtime = rt
        try:
            await rt.start()
        except Exception as e:
            log.error("%s", e if isinstance(e, StartupError) else f"refusing to start: {type(e).__name__}: {e}")
            await rt.stop()
            raise
        if settings.reload_on_sighup and settings.workers == 1:
            rt.lifecycle.install_signal_handler()  # SIGHUP: reload bundle_path beside the serving model
        try:
            yield
        finally:
            await rt.stop()

    app = FastAPI(title="sidrec", version="0.1.0", lifespan=lifespan,
                  description="Semantic-ID generative recommendation: wide-beam retrieval over a SID trie.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = ServiceRuntime(settings, metrics)  # not ready until the lifespan starts it
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app
