"""Request and response schemas of the HTTP API (pydantic v2).

Requests forbid unknown fields and carry static hard caps on every size; the tighter, deployment
specific limits from `Settings` (max beam width, max history, ...) are checked by `check_*`
below, which raise the same 422 error shape. Responses are plain models so /docs shows them.

Decisions documented here (and in /docs):
- An empty `history` is rejected (422 `empty_history`), and so is a history in which no id is in
  the catalogue (422 `unknown_history`): answering from no context would hand back the same
  unpersonalised list to everyone and hide client bugs. Unknown ids among known ones are
  reported in `unknown_history_ids` and otherwise ignored.
- `beam_width < top_n` is a 422: a beam search cannot return more items than it keeps beams.
- In /v1/recommend/batch one bad user does not fail the call: its slot holds an error object.
- `filter` keeps an item when, for every attribute named, one of the item's values is allowed;
  it is a mask inside the beam (the engine's), not a post-filter. `exclude` is the deprecated
  name of `exclude_items` (both are honoured).
- Item writes (/v1/items) bound the text, the number of attributes, their values and lengths;
  `text` may be omitted when updating an existing item (its SID then cannot move).
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from sidrec.service.errors import APIError
from sidrec.service.settings import Settings

HARD_MAX_IDS = 10_000  # static cap; Settings tightens it
HARD_MAX_ID_LEN = 1024

HARD_MAX_TEXT_LEN = 8192
HARD_MAX_ATTRIBUTES = 64
HARD_MAX_VALUES = 1000

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_ID_LEN)]
AttrName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
AttrValue = Annotated[str, StringConstraints(min_length=1, max_length=256)]
AttrValues = Annotated[list[AttrValue], Field(max_length=HARD_MAX_VALUES)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(Strict):
    history: list[ItemId] = Field(max_length=HARD_MAX_IDS, description="External item ids, oldest first.")
    top_n: int | None = Field(default=None, ge=1, le=4096, description="Items to return (default from settings).")
    beam_width: int | None = Field(default=None, ge=1, le=8192, description="Beams kept per SID level (>= top_n).")
    exclude_history: bool = Field(default=True, description="Never recommend an item already in the history.")
    exclude_items: list[ItemId] = Field(default_factory=list, max_length=HARD_MAX_IDS,
                                        description="Further item ids never to return (unknown ones are ignored).")
    exclude: list[ItemId] = Field(default_factory=list, max_length=HARD_MAX_IDS, json_schema_extra={"deprecated": True},
                                  description="Deprecated name of exclude_items.")
    filter: dict[AttrName, AttrValues] | None = Field(
        default=None, max_length=HARD_MAX_ATTRIBUTES,
        description="Attribute -> allowed values: an item passes when, for every attribute named, one of its "
                    "values is allowed. Applied inside the beam, so top_n stays full when enough items pass.")
    return_sids: bool = Field(default=True, description="Include each item's semantic id codes.")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="The ranking score: the log-probability of the item's whole SID under the "
                                     "model; where the bundle's transition mixture is on, the log of its mixture "
                                     "with the next-item probability (model/transitions.py); plus the "
                                     "text-similarity term where the bundle's re-rank or the cold-start blend "
                                     "applies (model/cold_start.py). GET /v1/model names the stages served.")
    sid: list[int] | None = None


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    catalogue_version: int = Field(description="Catalogue changes this replica had applied when it answered.")
    unknown_history_ids: list[str]
    history_used: int = Field(description="Known history items fed to the model (its most recent max_history).")
    beam_width: int
    top_n: int


class BatchRecommendRequest(Strict):
    requests: list[RecommendRequest] = Field(min_length=1, max_length=4096)


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorItem(BaseModel):
    error: ErrorInfo


class BatchRecommendResponse(BaseModel):
    results: list[Union[RecommendResponse, ErrorItem]]
    model_version: str
    catalogue_version: int


class ScoreRequest(Strict):
    history: list[ItemId] = Field(max_length=HARD_MAX_IDS)
    candidates: list[ItemId] = Field(min_length=1, max_length=HARD_MAX_IDS)


class CandidateScore(BaseModel):
    item_id: str
    log_likelihood: float


class ScoreResponse(BaseModel):
    scores: list[CandidateScore] = Field(description="Known candidates, in request order.")
    unknown_candidate_ids: list[str]
    unknown_history_ids: list[str]
    model_version: str


class MaskRequest(Strict):
    item_ids: list[ItemId] = Field(min_length=1, max_length=1_000_000)
    masked: bool = Field(default=True, description="True: never recommend these items; False: allow them again.")


class MaskResponse(BaseModel):
    updated: int
    unknown_item_ids: list[str]
    num_masked: int
    shared: bool = Field(description="True when the mask is shared with every worker through Redis.")


class ModelLoadRequest(Strict):
    bundle_path: str = Field(min_length=1, max_length=4096,
                             description="A bundle directory under the bundle root (SIDREC_BUNDLE_ROOT), absolute "
                                         "or relative to it.")


class ModelSwitchResponse(BaseModel):
    action: str = Field(description="load or rollback")
    model_version: str = Field(description="The version now serving new requests.")
    previous_version: str | None
    catalogue_version: int
    load_s: float = Field(description="Load + warm-up + catalogue re-quantization + switch, seconds.")
    switch_ms: float = Field(description="The switch itself: new requests go to the new model from then on.")
    migrated_items: int = Field(description="Run-time items given SIDs under the new model's codebooks.")
    lost_items: list[str] = Field(description="Run-time items that could not be carried (no text).")
    peak_rss_mb: float = Field(description="Peak resident memory of the service and its engines during the load.")
    reused_loaded_slot: bool = Field(description="True when the target was still loaded (rollback): no load.")


class LoadedVersion(BaseModel):
    version: str
    bundle_path: str
    loaded_at: float
    load_s: float
    requests_in_flight: int
    catalogue_version: int


class ModelVersions(BaseModel):
    current: LoadedVersion | None
    previous: LoadedVersion | None = Field(description="Kept loaded for an instant rollback.")
    history: list[dict[str, Any]] = Field(description="The last switches, newest last.")
    reload_in_progress: bool


class MaskedList(BaseModel):
    num_masked: int
    item_ids: list[str] = Field(description="Up to the first 1000 masked ids.")


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    model_loaded: bool
    warmed: bool
    index_reachable: bool
    catalogue_caught_up: bool = False
    model_version: str | None = None
    catalogue_version: int | None = None


class ModelInfo(BaseModel):
    version: str
    num_items: int
    created_at: str | None
    format_version: int | None
    architecture: dict[str, Any]
    sid_layout: dict[str, Any]
    metrics: dict[str, Any]
    evaluation: Any = None
    dataset: Any = None
    index: dict[str, Any]
    limits: dict[str, int]
    num_masked: int
    catalogue_version: int
    catalogue: dict[str, Any]
    ranking: dict[str, Any] = Field(default_factory=dict, description=(
        "The stages that re-score the beam's items, with the knobs this replica serves: the text re-rank "
        "and the transition mixture (weight 0: off)."))


# --- the living catalogue ---------------------------------------------------------------------------


class ItemIn(Strict):
    item_id: ItemId
    text: str | None = Field(default=None, min_length=1, max_length=HARD_MAX_TEXT_LEN,
                             description="Item text, embedded with the bundle's model (required for a new item; "
                                         "a changed text may move the item's SID).")
    attributes: dict[AttrName, AttrValues] | None = Field(
        default=None, max_length=HARD_MAX_ATTRIBUTES,
        description="Attribute -> values (filters match them); omitted: keep the item's current ones.")


class ItemsWriteRequest(Strict):
    items: list[ItemIn] = Field(min_length=1, max_length=1000)


class ItemWritten(BaseModel):
    item_id: str
    sid: list[int]


class ItemsWriteResponse(BaseModel):
    items: list[ItemWritten]
    catalogue_version: int
    model_version: str
    applied_locally: bool = Field(description="This replica's engine applied the change before answering.")
    embedded: int = Field(description="Items whose text was embedded and quantized (new or changed text).")
    timings_ms: dict[str, float] = Field(description="Server time per phase: read, embed (+quantize), store "
                                                     "(the atomic claim and log write), apply (this replica).")


class ItemIdsRequest(Strict):
    item_ids: list[ItemId] = Field(min_length=1, max_length=1000)


class ItemsDeleteResponse(BaseModel):
    updated: int
    unknown_item_ids: list[str]
    catalogue_version: int
    model_version: str


class ItemInfo(BaseModel):
    item_id: str
    sid: list[int]
    text: str | None
    attributes: dict[str, list[str]] | None
    deleted: bool
    in_bundle: bool
    catalogue_version: int
    model_version: str


# --- settings-dependent checks (same 422 shape as schema validation) -------------------------------


def _invalid(field: str, msg: str, code: str = "invalid_request") -> APIError:
    return APIError(422, code, f"{field}: {msg}", [{"loc": field.split("."), "msg": msg, "type": code}])


def _check_ids(field: str, ids: list[str], cap: int, settings: Settings) -> None:
    if len(ids) > cap:
        raise _invalid(field, f"at most {cap} ids allowed, got {len(ids)}")
    for i, x in enumerate(ids):
        if len(x) > settings.max_item_id_len:
            raise _invalid(f"{field}.{i}", f"item ids are at most {settings.max_item_id_len} characters, got {len(x)}")


def requested_size(req: RecommendRequest, settings: Settings) -> tuple[int, int]:
    """(top_n, beam_width) as asked, defaults filled in, not yet checked against the limits."""
    top_n = req.top_n or settings.default_top_n
    return top_n, req.beam_width or max(settings.default_beam_width, top_n)


def resolve_recommend(req: RecommendRequest, settings: Settings, prefix: str = "") -> tuple[int, int]:
    """Check `req` against the deployment's limits; return its (top_n, beam_width)."""
    top_n, beam = requested_size(req, settings)
    if top_n > settings.max_top_n:
        raise _invalid(prefix + "top_n", f"must be <= {settings.max_top_n}, got {top_n}")
    if beam > settings.max_beam_width:
        raise _invalid(prefix + "beam_width", f"must be <= {settings.max_beam_width}, got {beam}")
    if beam < top_n:
        raise _invalid(prefix + "beam_width", f"beam_width ({beam}) must be >= top_n ({top_n}): "
                       "a beam search returns at most beam_width items")
    _check_ids(prefix + "history", req.history, settings.max_history_len, settings)
    _check_ids(prefix + "exclude_items", req.exclude_items + req.exclude, settings.max_exclude, settings)
    if req.filter is not None:
        n = sum(len(v) for v in req.filter.values())
        if n > settings.max_filter_values:
            raise _invalid(prefix + "filter", f"at most {settings.max_filter_values} allowed values in all, got {n}")
    if not req.history:
        raise _invalid(prefix + "history", "is empty; send at least one known item id (oldest first)",
                       "empty_history")
    return top_n, beam


def check_score(req: ScoreRequest, settings: Settings) -> None:
    _check_ids("history", req.history, settings.max_history_len, settings)
    _check_ids("candidates", req.candidates, settings.max_candidates, settings)
    if not req.history:
        raise _invalid("history", "is empty; send at least one known item id (oldest first)", "empty_history")


def check_batch(req: BatchRecommendRequest, settings: Settings) -> None:
    if len(req.requests) > settings.max_batch_requests:
        raise _invalid("requests", f"at most {settings.max_batch_requests} requests per batch, got {len(req.requests)}")


def check_mask(req: MaskRequest, settings: Settings) -> None:
    _check_ids("item_ids", req.item_ids, settings.max_admin_items, settings)


def no_known_history(field: str, unknown: list[str]) -> APIError:
    shown = unknown[:20]
    return APIError(422, "unknown_history", f"{field}: none of the {len(unknown)} history ids is in the catalogue; "
                    "send ids the model was trained on (see GET /v1/model for the catalogue size)",
                    {"unknown_history_ids": shown, "num_unknown": len(unknown)})


def check_items(req: ItemsWriteRequest, settings: Settings) -> None:
    if len(req.items) > settings.max_items_per_write:
        raise _invalid("items", f"at most {settings.max_items_per_write} items per call, got {len(req.items)}")
    seen: set[str] = set()
    for n, it in enumerate(req.items):
        if len(it.item_id) > settings.max_item_id_len:
            raise _invalid(f"items.{n}.item_id", f"item ids are at most {settings.max_item_id_len} characters")
        if it.item_id in seen:
            raise _invalid(f"items.{n}.item_id", f"item {it.item_id!r} appears twice in one call")
        seen.add(it.item_id)
        if it.text is not None and len(it.text) > settings.max_item_text_len:
            raise _invalid(f"items.{n}.text", f"at most {settings.max_item_text_len} characters, got {len(it.text)}")
        if it.attributes is not None:
            if len(it.attributes) > settings.max_item_attributes:
                raise _invalid(f"items.{n}.attributes",
                               f"at most {settings.max_item_attributes} attributes, got {len(it.attributes)}")
            for name, values in it.attributes.items():
                if len(values) > settings.max_attribute_values:
                    raise _invalid(f"items.{n}.attributes.{name}",
                                   f"at most {settings.max_attribute_values} values, got {len(values)}")
