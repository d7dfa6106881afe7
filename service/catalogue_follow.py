"""CatalogueFollower: one replica's background task that mirrors the catalogue store into its engine.

On start it reads a snapshot (every item changed since the bundle, the version and the log
position it stands for), applies it, and then follows the change log from that position: a
Redis XREAD BLOCK (or the in-process log), each entry applied through the engine's own calls
(`add_items` for new or moved SIDs, `set_attributes`, `set_masked`), on the engine thread
between batches. Entries carry consecutive catalogue versions; one that skips a version means
the stream was trimmed past this replica (the last id it saw is older than the first one kept):
the follower resyncs from a snapshot instead of silently losing changes. After a connection
error it is not caught up (readiness says so) until a read succeeds again.

The engine mirror may lag by up to one read; that is safe because the inverse-index lookup of
every request (service.index) is the final gate for deletions. This module does not write to
the store (see `service.items`) and imports no web framework.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import torch

from sidrec.service.catalogue_store import CatalogueStore, ItemState, decode_embedding
from sidrec.service.index import SidCodec

log = logging.getLogger("sidrec.catalogue")

Add = tuple[str, int, "dict | None", "str | None"]  # item id, packed SID, attributes, encoded embedding


class CatalogueFollower:
    def __init__(self, store: CatalogueStore, engine: Any, run_on_engine: Callable[[Callable[[], Any]], Awaitable[Any]],
                 codec: SidCodec, base_sid: dict[str, int], admin_masked: Callable[[str], bool] = lambda i: False,
                 block_s: float = 1.0, retry_s: float = 0.5) -> None:
        self.store = store
        self.engine = engine
        self.run_on_engine = run_on_engine
        self.codec = codec
        self.base_sid = base_sid  # bundle item id -> packed SID
        self.admin_masked = admin_masked
        self.block_s = block_s
        self.retry_s = retry_s
        self.applied = 0  # catalogue version mirrored into the engine
        self.position = "0"
        self.sids: dict[str, int] = {}  # packed SID applied for each item added or moved
        self.deleted: set[str] = set()  # ids this follower masked in the engine
        self.attrs: dict[str, dict] = {}  # attributes set on the engine since the bundle
        self.emb: dict[str, str] = {}  # text embedding (encoded) of each added or moved item that has one
        self.caught_up = False
        self.resyncs = 0
        self.apply_errors = 0
        self.live_timeout_s = 30.0  # longest wait for a background trie rebuild before moving on
        self.last_applied_at = 0.0
        self._task: asyncio.Task | None = None
        self._progress = asyncio.Condition()

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Catch up (snapshot) before returning, then follow in the background."""
        await self.resync()
        self.caught_up = True
        self.resume()

    def resume(self) -> None:
        """Follow the log from the last position applied (no snapshot: a gap is detected on read)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="sidrec-catalogue-follow")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def wait_for(self, version: int, timeout_s: float) -> bool:
        """Until this replica's engine has applied `version` (read-your-writes for the writer)."""
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.applied >= version), timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.store.backend, "applied_version": self.applied, "caught_up": self.caught_up,
                "resyncs": self.resyncs, "apply_errors": self.apply_errors, "items_changed": len(self.sids), "deleted": len(self.deleted)}

    def mirror_resolver(self, base: dict[int, str]) -> Callable[[int], str | None]:
        """packed SID -> item id from this replica's mirror (`base`: the bundle's packed SID -> id):
        the final gate while the store is unreachable. An added or moved SID maps to its item, a
        bundle SID its item left maps to nothing, and so does an item deleted as last applied."""
        cache: dict[str, Any] = {"applied": None, "size": -1, "owner": {}}

        def resolve(packed: int) -> str | None:
            if cache["applied"] != self.applied or cache["size"] != len(self.sids):
                cache.update(applied=self.applied, size=len(self.sids),
                             owner={p: iid for iid, p in self.sids.items()})
            iid = cache["owner"].get(packed)
            if iid is None:
                iid = base.get(packed)
                if iid is not None and self.sids.get(iid, packed) != packed:
                    return None  # the item moved to another SID
            return None if iid is None or iid in self.deleted else iid

        return resolve

    def reapply(self, engine: Any) -> None:
        """Put everything this replica mirrored into a fresh engine (say a restarted engine process,
        before it takes traffic): synchronous, on the caller's thread, waits for the trie."""
        if self.sids:
            ids = list(self.sids)
            sids = torch.tensor([self.codec.unpack(self.sids[i]) for i in ids], dtype=torch.int64).t()
            engine.add_items(ids, sids.contiguous(), attributes=[self.attrs.get(i) for i in ids], wait=True,
                             embeddings=[decode_embedding(self.emb.get(i)) for i in ids])
        rest = [i for i in self.attrs if i not in self.sids]
        if rest:
            engine.set_attributes(rest, [self.attrs[i] for i in rest])
        if self.deleted:
            engine.set_masked(sorted(self.deleted), True)

    # --- following --------------------------------------------------------------------------------

    async def resync(self) -> None:
        snap = await self.store.snapshot()
        states = snap.states
        gone = self.deleted - {s.item_id for s in states if s.deleted}
        await self._apply(states, undelete=sorted(gone))
        await self._advance(snap.version, snap.position)

    async def _follow(self) -> None:
        while True:
            try:
                changes = await self.store.read_changes(self.position, self.block_s)
                for ch in changes:
                    if ch.version <= self.applied:
                        self.position = ch.position
                        continue
                    if ch.version != self.applied + 1:
                        log.warning("catalogue log skips from version %d to %d (trimmed past this replica): "
                                    "resyncing from a snapshot", self.applied, ch.version)
                        self.resyncs += 1
                        await self.resync()
                        break
                    await self._apply(ch.states)
                    await self._advance(ch.version, ch.position)
                if not changes and not self.caught_up:
                    self.caught_up = True  # a read succeeded with nothing left to apply
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.caught_up:
                    log.warning("catalogue follow failed; not caught up until a read succeeds", exc_info=True)
                self.caught_up = False
                await asyncio.sleep(self.retry_s)

    async def _advance(self, version: int, position: str) -> None:
        async with self._progress:
            self.applied = max(self.applied, version)
            self.position = position
            self.last_applied_at = time.monotonic()
            self._progress.notify_all()

    async def _apply(self, states: Sequence[ItemState], undelete: Sequence[str] = ()) -> None:
        adds: list[Add] = []  # None attributes: leave the item's as they are
        attrs: list[tuple[str, dict]] = []
        mask, unmask = [], list(undelete)
        for st in states:
            packed = st.sid if st.sid is not None else self.base_sid.get(st.item_id)
            if packed is None:
                continue  # a state without a SID: nothing the engine can hold
            held = self.sids.get(st.item_id, self.base_sid.get(st.item_id))
            if held != packed or (st.embedding and st.embedding != self.emb.get(st.item_id)):
                # a new or moved SID, or new text that kept its SID (the embedding still changed)
                adds.append((st.item_id, packed, st.attributes if st.attributes is not None
                             else (None if st.item_id in self.base_sid else {}), st.embedding))
            elif st.attributes is not None:
                attrs.append((st.item_id, st.attributes))
            if st.deleted and st.item_id not in self.deleted:
                mask.append(st.item_id)
            elif not st.deleted and st.item_id in self.deleted:
                unmask.append(st.item_id)
        unmask = [i for i in unmask if not self.admin_masked(i)]
        if not (adds or attrs or mask or unmask):
            return
        engine = self.engine
        generation: list[int] = []

        def work() -> None:
            if adds:
                generation.extend(self._add(adds))
            if attrs:
                engine.set_attributes([a[0] for a in attrs], [a[1] for a in attrs])
            if mask:
                engine.set_masked(mask, True)
            if unmask:
                engine.set_masked(unmask, False)

        try:
            await self.run_on_engine(work)
        except Exception:  # the engine refused (or lacks the call): skipping beats stalling every later change
            self.apply_errors += 1
            log.error("could not apply %d catalogue changes to the engine; the lookup gate still hides "
                      "deleted items", len(states), exc_info=True)
        if generation:
            await self._until_live(max(generation))
        for iid, packed, _, emb in adds:
            self.sids[iid] = packed
            if emb:
                self.emb[iid] = emb
            else:
                self.emb.pop(iid, None)
        self.attrs.update((iid, a) for iid, _, a, _ in adds if a is not None)
        self.attrs.update(attrs)
        self.deleted.update(mask)
        self.deleted.difference_update(unmask)

    def _add(self, adds: list[Add]) -> list[int]:
        """engine.add_items for the batch; on a refusal, item by item so one bad entry (logged) does
        not stall the log: the lookup gate keeps responses right whatever the mirror holds."""
        gens: list[int] = []

        def one(batch: list[Add]) -> None:
            sids = torch.tensor([self.codec.unpack(a[1]) for a in batch], dtype=torch.int64).t()  # (L, n)
            gen = self.engine.add_items([a[0] for a in batch], sids.contiguous(), attributes=[a[2] for a in batch],
                                        wait=False, embeddings=[decode_embedding(a[3]) for a in batch])
            if isinstance(gen, int):
                gens.append(gen)

        try:
            one(adds)
        except ValueError:
            for a in adds:
                try:
                    one([a])
                except ValueError as e:
                    try:  # an embedding the engine cannot use (another dimension) must not cost the item
                        if a[3] is None:
                            raise
                        one([(a[0], a[1], a[2], None)])
                        log.warning("catalogue item %s added without its embedding: %s", a[0], e)
                    except ValueError as e2:
                        log.error("engine refused catalogue item %s: %s", a[0], e2)
        return gens

    async def _until_live(self, generation: int) -> None:
        """The engine rebuilds its trie off the request path (add_items(wait=False) returns the
        generation that will serve the items): a version counts as applied once that generation is
        live, so `wait_for` means "recommend() sees it". Polled off the engine thread."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.live_timeout_s:
            live = await asyncio.to_thread(lambda: self.engine.trie_generation)
            if not isinstance(live, int) or live >= generation:
                return
            await asyncio.sleep(0.002)
        log.warning("trie generation %d not live after %g s; carrying on", generation, self.live_timeout_s)
