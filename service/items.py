"""ItemCatalogue: the request side of the living catalogue (/v1/items), no HTTP.

A write embeds the texts that are new or changed with the bundle's embedding model
(`model.text_embed`), quantizes them with the bundle's codebooks and lists each item's candidate
SIDs (`model.sid_assign`), then hands them to the catalogue store, which claims the first free
one of each atomically (never two items on one SID) and logs the change for every replica. An
item whose text did not change keeps its SID (an attribute update never moves it); an item whose
new text quantizes to the prefix it already holds keeps its SID too. The call then waits, up to
`catalogue_apply_wait_s`, for this replica's engine to apply it. Deletions need no wait: the
inverse-index lookup of every request reads the store's deleted set.

This module does not follow the log (see `service.catalogue_follow`) nor store anything itself.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

import numpy as np
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidrec.model.sid_assign import SidSpaceFull, candidate_sids, quantize
from sidrec.model.text_embed import MissingEmbedExtra, TextEmbedder
from sidrec.service import schemas as S
from sidrec.service.catalogue_follow import CatalogueFollower
from sidrec.service.catalogue_store import CatalogueStore, ItemState, Upsert, encode_embedding
from sidrec.service.errors import APIError
from sidrec.service.index import SidCodec
from sidrec.service.settings import Settings

log = logging.getLogger("sidrec.catalogue")


def base_items_of(bundle: Any) -> dict[str, dict[str, Any]]:
    """A bundle's base items' text and attributes by id, from what the bundle carries: per-index
    `item_texts` / `item_attributes` (items.jsonl), or an `items` list of {item_id, text,
    attributes} or dict by id; {} for a bundle (or an engine process's BundleInfo) with none."""
    ids = list(getattr(bundle, "item_ids", []) or [])
    texts = getattr(bundle, "item_texts", None)
    attrs = getattr(bundle, "item_attributes", None)
    if texts or attrs:
        out: dict[str, dict[str, Any]] = {}
        for i, iid in enumerate(ids):
            t = texts[i] if texts and i < len(texts) else None
            a = attrs[i] if attrs and i < len(attrs) else None
            if t is not None or a:
                out[str(iid)] = {"text": t, "attributes": a}
        return out
    items = getattr(bundle, "items", None)
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): dict(v) for k, v in items.items()}
    out = {}
    for i, it in enumerate(items):
        if isinstance(it, dict):
            iid = it.get("item_id", ids[i] if i < len(ids) else None)
            if iid is not None:
                out[str(iid)] = it
    return out


class ItemCatalogue:
    def __init__(self, settings: Settings, store: CatalogueStore, follower: CatalogueFollower, codec: SidCodec,
                 base_sid: dict[str, int], base_items: dict[str, dict[str, Any]], codebooks: list[np.ndarray],
                 embedder: TextEmbedder | None, spread: bool, model_version: str) -> None:
        self.settings = settings
        self.store = store
        self.follower = follower
        self.codec = codec
        self.base_sid = base_sid
        self.base_items = base_items
        self.codebooks = codebooks
        self.embedder = embedder
        self.spread = spread
        self.model_version = model_version

    # --- writes -----------------------------------------------------------------------------------

    def _assign_candidates(self, texts: list[str]) -> list[tuple[list[int], str]]:
        """Embed + quantize (a worker thread: CPU-bound) -> each text's candidate packed SIDs and
        its embedding (encode_embedding), which the replicas' cold-start blend compares."""
        assert self.embedder is not None
        X = self.embedder.embed(texts)
        codes, residual = quantize(X, self.codebooks)
        cands = candidate_sids(codes, residual, self.codebooks, self.codec.cardinalities, self.spread)
        return [([self.codec.pack(c) for c in row], encode_embedding(x)) for row, x in zip(cands, X)]

    async def upsert(self, req: S.ItemsWriteRequest) -> S.ItemsWriteResponse:
        S.check_items(req, self.settings)
        ids = [it.item_id for it in req.items]
        t0 = time.perf_counter()
        current = await self._store_call(self.store.get(ids))
        todo: list[int] = []  # positions of items whose SID comes from their text
        for n, it in enumerate(req.items):
            known = it.item_id in self.base_sid or (it.item_id in current and current[it.item_id].sid is not None)
            if not known and it.text is None:
                raise APIError(422, "invalid_request", f"items.{n}.text: item {it.item_id!r} is new; its text is "
                               "required to give it a semantic id", [{"loc": ["items", n, "text"],
                                                                     "msg": "required for a new item",
                                                                     "type": "missing"}])
            if it.text is not None and (not known or it.text != self._text(it.item_id, current)):
                todo.append(n)
        cands: dict[int, tuple[list[int], str]] = {}
        t1 = time.perf_counter()
        if todo:
            if self.embedder is None or not self.codebooks:
                raise APIError(409, "cannot_assign_sids", "this bundle holds no RQ-KMeans codebooks in its "
                               "embedding space, so new text cannot get a semantic id; update attributes only "
                               "or add the items with a bundle built by `sidrec train`")
            try:
                rows = await asyncio.to_thread(self._assign_candidates, [req.items[n].text for n in todo])
            except MissingEmbedExtra as e:  # a server installed without the text encoder
                raise APIError(503, "embedding_unavailable", f"new text cannot be embedded on this server: {e}; "
                               "attribute-only updates still work") from None
            cands = dict(zip(todo, rows))
        ups = []
        for n, it in enumerate(req.items):
            cur = current.get(it.item_id)
            text = it.text if it.text is not None else (cur.text if cur else None)
            attrs = it.attributes if it.attributes is not None else (cur.attributes if cur else None)
            cand, emb = cands.get(n, (None, cur.embedding if cur and text == cur.text else None))
            ups.append(Upsert(it.item_id, text, attrs, cand, self.base_sid.get(it.item_id), emb))
        t2 = time.perf_counter()
        try:
            res = await self._store_call(self.store.upsert(ups))
        except SidSpaceFull as e:
            raise APIError(409, "sid_space_full", f"{e}; nothing in this call was written: the bundle's layout has "
                           f"{self.codec.cardinalities[-1]} de-duplication codes per prefix",
                           {"item_id": str(e).split(":")[0].removeprefix("item ")}) from None
        t3 = time.perf_counter()
        applied = await self.follower.wait_for(res.version, self.settings.catalogue_apply_wait_s)
        t4 = time.perf_counter()
        by_id = {s.item_id: s for s in res.states}
        out = [S.ItemWritten(item_id=i, sid=list(self.codec.unpack(self._sid(i, by_id.get(i))))) for i in ids]
        return S.ItemsWriteResponse(items=out, catalogue_version=res.version, model_version=self.model_version,
                                    applied_locally=applied, embedded=len(todo),
                                    timings_ms={"read": 1e3 * (t1 - t0), "embed": 1e3 * (t2 - t1),
                                                "store": 1e3 * (t3 - t2), "apply": 1e3 * (t4 - t3)})

    async def set_deleted(self, item_ids: Sequence[str], deleted: bool) -> S.ItemsDeleteResponse:
        ids = list(dict.fromkeys(item_ids))
        for n, x in enumerate(ids):
            if len(x) > self.settings.max_item_id_len:
                raise APIError(422, "invalid_request", f"item_ids.{n}: item ids are at most "
                               f"{self.settings.max_item_id_len} characters")
        base = {i: self.base_sid[i] for i in ids if i in self.base_sid}
        res = await self._store_call(self.store.set_deleted(ids, deleted, base))
        # The lookup gate reads the deleted set: the write alone keeps deleted ids out of every
        # response from now on; the engine's mask (which keeps lists full) follows within a read.
        await self.follower.wait_for(res.version, self.settings.catalogue_apply_wait_s)
        return S.ItemsDeleteResponse(updated=len(res.states), unknown_item_ids=res.unknown,
                                     catalogue_version=res.version, model_version=self.model_version)

    # --- reads ------------------------------------------------------------------------------------

    async def get(self, item_id: str) -> S.ItemInfo:
        if len(item_id) > self.settings.max_item_id_len:
            raise APIError(422, "invalid_request", f"item_id: item ids are at most {self.settings.max_item_id_len} "
                           f"characters, got {len(item_id)}")
        state = (await self._store_call(self.store.get([item_id]))).get(item_id)
        in_bundle = item_id in self.base_sid
        if state is None and not in_bundle:
            raise APIError(404, "unknown_item", f"item {item_id!r} is neither in the bundle nor added since")
        base = self.base_items.get(item_id, {})
        text = state.text if state is not None and state.text is not None else base.get("text")
        attrs = (state.attributes if state is not None and state.attributes is not None
                 else base.get("attributes"))
        return S.ItemInfo(item_id=item_id, sid=list(self.codec.unpack(self._sid(item_id, state))), text=text,
                          attributes=attrs, deleted=bool(state and state.deleted), in_bundle=in_bundle,
                          catalogue_version=self.follower.applied, model_version=self.model_version)

    # --- helpers ----------------------------------------------------------------------------------

    def _text(self, item_id: str, current: dict[str, ItemState]) -> str | None:
        cur = current.get(item_id)
        if cur is not None and cur.text is not None:
            return cur.text
        return self.base_items.get(item_id, {}).get("text")

    def _sid(self, item_id: str, state: ItemState | None) -> int:
        if state is not None and state.sid is not None:
            return state.sid
        return self.base_sid[item_id]

    async def _store_call(self, coro):
        try:
            return await coro
        except (SidSpaceFull, APIError):
            raise
        except (TimeoutError, asyncio.TimeoutError, RedisTimeoutError):
            log.exception("catalogue store call timed out")
            raise APIError(503, "catalogue_unavailable", "the catalogue store did not answer in time; the write "
                           "may or may not have been applied: retry it (a repeated write changes nothing more)",
                           headers={"Retry-After": "1"}) from None
        except Exception:
            log.exception("catalogue store call failed")
            raise APIError(503, "catalogue_unavailable", "the catalogue store is unreachable; nothing was "
                           "written, retry shortly", headers={"Retry-After": "1"}) from None
