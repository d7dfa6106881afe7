"""ModelLifecycle: load a bundle version beside the running one, warm it, switch; roll back.

A load opens a second `ModelSlot` (engine, index, batcher, catalogue) while the first keeps
serving, gives the items added at run time SIDs under the new model's codebooks from their stored
text (they live in the catalogue store, per model version), brings it to the operator masks, and
then switches with one assignment: requests already running finish on the slot they took, every
response names the version that served it. The replaced slot stays loaded (`keep_previous_model`)
so a rollback is the same switch back, or is drained and closed.

Refusals (the running model keeps serving, the message names the fault): a path outside
`bundle_root`, a broken bundle (checksums, shapes, files, format version: whatever load_bundle
refuses), a bundle that cannot re-quantize the live catalogue's run-time items (no RQ-KMeans
codebooks in a text-embedding space), memory that would not hold two models, and a load while
another is running. Triggered by the admin endpoints and by SIGHUP (reload `bundle_path`, e.g. a
link an operator re-pointed). Not here: how a slot is built (`service.model_slot`).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sidrec.model.bundle import BundleError, read_config
from sidrec.model.sid_assign import SidSpaceFull
from sidrec.service import schemas as S
from sidrec.service.errors import APIError
from sidrec.service.memory import InsufficientMemory, RssPeak, check_room, tree_rss_bytes
from sidrec.service.model_slot import ModelSlot, StartupError

if TYPE_CHECKING:
    from sidrec.service.runtime import ServiceRuntime

log = logging.getLogger("sidrec.lifecycle")
MB = 2 ** 20


def bundle_bytes(path: str | Path) -> int:
    """Bytes of a bundle's own files (the report folder aside)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


class ModelLifecycle:
    def __init__(self, runtime: "ServiceRuntime") -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self.history: list[dict[str, Any]] = []  # one record per switch, newest last
        self._signals = False

    # --- entry points ---------------------------------------------------------------------------

    async def load(self, bundle_path: str) -> S.ModelSwitchResponse:
        """Load `bundle_path` beside the serving model, warm it, switch to it."""
        if self._lock.locked():
            raise APIError(409, "reload_in_progress", "another model load or rollback is running; retry when it ends",
                           headers={"Retry-After": "5"})
        async with self._lock:
            path = self._resolve(bundle_path)
            cfg = self._preflight(path)
            current = self.rt.slot
            if current is not None and cfg.get("version") == current.version:
                raise APIError(409, "already_serving", f"version {current.version} is the one serving; nothing to do")
            previous = self.rt.previous
            if previous is not None and previous.version == cfg.get("version"):
                return await self._switch_to(previous, "load", time.monotonic(), RssPeak(), reused=True)
            self._check_memory(path)
            t0 = time.monotonic()
            with RssPeak() as peak:
                try:
                    new = await ModelSlot.open(self.settings, self.rt.metrics, str(path), self.rt.masked,
                                               warm=self.settings.warmup)
                except StartupError as e:
                    raise APIError(422, "bundle_unusable", f"refusing to load {path}: {e}; the running model "
                                   "keeps serving") from None
                try:
                    return await self._switch_to(new, "load", t0, peak)
                except BaseException:
                    await new.close()
                    raise

    async def rollback(self) -> S.ModelSwitchResponse:
        """Switch back to the model served before the last switch."""
        if self._lock.locked():
            raise APIError(409, "reload_in_progress", "a model load is running; retry when it ends",
                           headers={"Retry-After": "5"})
        async with self._lock:
            previous = self.rt.previous
            if previous is None:
                raise APIError(409, "no_previous_version", "no previous model is loaded to roll back to (a load with "
                               "SIDREC_KEEP_PREVIOUS_MODEL=false closes it); load the version by path instead")
            return await self._switch_to(previous, "rollback", time.monotonic(), RssPeak(), reused=True)

    def describe(self) -> S.ModelVersions:
        slot, prev = self.rt.slot, self.rt.previous
        return S.ModelVersions(current=_slot_info(slot), previous=_slot_info(prev), history=list(self.history[-20:]),
                               reload_in_progress=self._lock.locked())

    # --- the switch ---------------------------------------------------------------------------

    async def _switch_to(self, new: ModelSlot, action: str, t0: float, peak: RssPeak,
                         reused: bool = False) -> S.ModelSwitchResponse:
        old = self.rt.slot
        migrated, lost = await self._migrate(old, new)
        await self.rt.align_masks(new)
        t_switch = time.perf_counter()
        self.rt.install(new)
        switch_ms = 1e3 * (time.perf_counter() - t_switch)
        # Writes that reached the old version while the new one was being prepared: copy again
        # (idempotent: items already there keep their SIDs). The switch is done: a failure here
        # is logged, never allowed to undo it.
        try:
            more, lost2 = await self._migrate(old, new)
        except Exception as e:
            log.error("after the switch to %s, copying late catalogue writes failed: %s", new.version,
                      getattr(e, "message", e))
            more, lost2 = 0, []
        if self.settings.keep_previous_model:
            retire, self.rt.previous = (self.rt.previous if self.rt.previous is not new else None), old
        else:
            retire, self.rt.previous = old, None
        if retire is not None and retire is not new:
            task = asyncio.create_task(self._retire(retire), name=f"sidrec-retire-{retire.version}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        record = {"action": action, "version": new.version, "previous_version": old.version if old else None,
                  "at": time.time(), "load_s": round(time.monotonic() - t0, 3), "switch_ms": round(switch_ms, 3),
                  "migrated_items": migrated + more, "lost_items": sorted(set(lost) | set(lost2)),
                  "peak_rss_mb": round(max(peak.bytes, tree_rss_bytes()) / MB, 1), "reused_loaded_slot": reused}
        self.history.append(record)
        log.info("model switched: %s", record)
        return S.ModelSwitchResponse(model_version=new.version, catalogue_version=new.catalogue_version, **{
            k: v for k, v in record.items() if k not in ("version", "at")})

    async def _retire(self, slot: ModelSlot) -> None:
        """Close a replaced slot once the requests that took it have answered."""
        if not await slot.drain(self.settings.reload_drain_s):
            log.warning("closing version %s with %d requests still on it after %.0f s", slot.version,
                        slot.inflight, self.settings.reload_drain_s)
        await slot.close()

    async def _migrate(self, old: ModelSlot | None, new: ModelSlot) -> tuple[int, list[str]]:
        """Copy the run-time catalogue of `old`'s version into `new`'s: items added or changed get
        SIDs under the new codebooks from their text; attributes and deletions carry over.
        Returns (items written, ids that could not be carried: no text to give them a SID)."""
        if old is None or old is new or old.store is None or new.items is None or old.items is None:
            return 0, []
        snap = await old.store.snapshot()
        writes, deleted, lost = [], [], []
        new_base = new.items.base_items
        for st in snap.states:
            in_new = st.item_id in new.items.base_sid
            old_base = old.items.base_items.get(st.item_id, {})
            text = st.text if st.text is not None else (None if in_new else old_base.get("text"))
            if in_new and text == new_base.get(st.item_id, {}).get("text"):
                text = None  # the new bundle already knows this text: its SID stays the trained one
            attrs = st.attributes if st.attributes is not None else (None if in_new else old_base.get("attributes"))
            if not in_new and not text:
                lost.append(st.item_id)
                continue
            if text is not None or attrs is not None:
                try:
                    writes.append(S.ItemIn(item_id=st.item_id, text=text, attributes=attrs))
                except ValidationError:  # a bundle text longer than a write may carry
                    lost.append(st.item_id)
                    continue
            if st.deleted:
                deleted.append(st.item_id)
        if lost:
            log.warning("%d run-time items have no text to re-quantize under %s: %s", len(lost), new.version, lost[:10])
        step = self.settings.max_items_per_write
        try:
            for i in range(0, len(writes), step):
                await new.items.upsert(S.ItemsWriteRequest(items=writes[i:i + step]))
            for i in range(0, len(deleted), step):
                await new.items.set_deleted(deleted[i:i + step], True)
        except APIError as e:
            raise APIError(409, "incompatible_bundle", f"the live catalogue cannot move to version {new.version}: "
                           f"{e.message}; the running model keeps serving", e.details) from None
        except SidSpaceFull as e:
            raise APIError(409, "incompatible_bundle", f"the live catalogue does not fit version {new.version}'s "
                           f"SID layout ({e}); the running model keeps serving") from None
        return len(writes), lost

    # --- checks ---------------------------------------------------------------------------------

    def _root(self) -> Path:
        s = self.settings
        return Path(s.bundle_root).resolve() if s.bundle_root else Path(s.bundle_path).resolve().parent

    def _resolve(self, bundle_path: str) -> Path:
        root, path = self._root(), Path(bundle_path)
        try:
            path = (path if path.is_absolute() else root / path).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, ...
            raise APIError(422, "invalid_request", f"bundle_path {bundle_path!r} is not a usable path ({e})") from None
        if not path.is_relative_to(root):
            raise APIError(422, "invalid_request", f"bundle_path {bundle_path!r} is outside the bundle root {root} "
                           "(SIDREC_BUNDLE_ROOT); only bundles under it can be loaded")
        try:
            is_dir = path.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            raise APIError(422, "bundle_unusable", f"no bundle directory at {path}")
        return path

    def _preflight(self, path: Path) -> dict[str, Any]:
        """Cheap refusals before anything loads: unreadable config, wrong format, a layout that
        cannot hold the live catalogue's run-time items."""
        try:
            cfg = read_config(path)
        except BundleError as e:
            raise APIError(422, "bundle_unusable", f"refusing to load {path}: {e}; the running model keeps serving"
                           ) from None
        follower = self.rt.slot.follower if self.rt.slot else None
        runtime_items = len(follower.sids) if follower is not None else 0
        method = (cfg.get("sid") or {}).get("method", "rq_kmeans")
        if runtime_items and (method != "rq_kmeans" or not (path / "codebooks.safetensors").is_file()):
            raise APIError(409, "incompatible_bundle", f"the live catalogue holds {runtime_items} items added or moved "
                           f"at run time, and {path} has no RQ-KMeans codebooks (sid method {method!r}) to give them "
                           "semantic ids; the running model keeps serving")
        return cfg

    def _check_memory(self, path: Path) -> None:
        """Two models must fit: the serving engine's footprint, scaled by the bundles' sizes."""
        slot = self.rt.slot
        if slot is None:
            return
        pid = getattr(slot.engine, "pid", None)
        footprint = tree_rss_bytes(pid) if pid else 3 * bundle_bytes(slot.bundle_path)
        needed = int(footprint * bundle_bytes(path) / max(bundle_bytes(slot.bundle_path), 1))
        try:
            check_room(needed, self.settings.reload_headroom_mb * MB)
        except InsufficientMemory as e:
            raise APIError(507, "insufficient_memory", str(e)) from None

    # --- SIGHUP ---------------------------------------------------------------------------------

    def install_signal_handler(self) -> bool:
        """SIGHUP reloads `bundle_path` (where the loop allows signal handlers: the main thread)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        self._signals = True
        return True

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self._reload_from_signal(), name="sidrec-sighup-reload")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _reload_from_signal(self) -> None:
        try:
            # bundle_path is relative to the working directory (an API path is relative to the root)
            out = await self.load(str(Path(self.settings.bundle_path).absolute()))
            log.warning("SIGHUP: now serving %s (was %s)", out.model_version, out.previous_version)
        except APIError as e:
            log.warning("SIGHUP: no switch: %s", e.message)

    async def stop(self) -> None:
        if self._signals:
            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


def _slot_info(slot: ModelSlot | None) -> S.LoadedVersion | None:
    if slot is None:
        return None
    return S.LoadedVersion(version=slot.version, bundle_path=slot.bundle_path, loaded_at=slot.opened_at,
                           load_s=round(slot.open_seconds, 3), requests_in_flight=slot.inflight,
                           catalogue_version=slot.catalogue_version)
