"""The catalogue store: everything that changed since the bundle, per model version, and the
change log replicas follow. Redis is the source of truth (`RedisCatalogueStore`); without Redis,
`InProcessCatalogueStore` has the same interface and serves one replica.

Redis layout, beside the inverse index of `service.index` (same `{ns}:{version}:` prefix):

    {ns}:{version}:cat:rec        hash  item id -> JSON {"text", "attributes"} (the last write wins)
    {ns}:{version}:cat:sid        hash  item id -> packed SID, for items added or moved since the bundle
    {ns}:{version}:cat:owner      hash  packed SID -> item id; "" marks a bundle SID its item left
    {ns}:{version}:cat:deleted    set   deleted item ids (they keep their SID: restore brings them back)
    {ns}:{version}:cat:version    int   the catalogue version: +1 per write call, 0 = the bundle
    {ns}:{version}:cat:log        stream, one entry per version: v, s = JSON [[id, sid, rec, deleted], ...]

Every write is one Lua script: it claims SIDs (the first free one of each item's candidates,
checking the owner hash, then the bundle's bucket; all or nothing for the call), updates the
hashes, INCRs the version and XADDs (MAXLEN ~) the full new state of every item touched, so
replaying an entry is idempotent and versions in the stream are consecutive: a follower that
reads version v > applied + 1 knows the stream was trimmed past it and resyncs from `snapshot`.
Dynamic bucket keys inside the script assume one primary (as the inverse index does).

This module neither embeds nor quantizes (see `service.items`) nor touches an engine (see
`service.catalogue_follow`); SIDs here are packed integers (`service.index.SidCodec`).
"""
from __future__ import annotations

import asyncio
import base64
import json
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sidrec.model.sid_assign import SidSpaceFull
from sidrec.service.index import SidCodec, keys


@dataclass(frozen=True)
class ItemState:
    """One item's full state in the catalogue layer (what a follower applies)."""

    item_id: str
    sid: int | None  # packed SID; None: the bundle's SID, never moved
    text: str | None  # None: the bundle's
    attributes: dict[str, list[str]] | None  # None: the bundle's
    deleted: bool
    embedding: str | None = None  # the text's embedding (encode_embedding) where the writer had it

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "sid": self.sid, "text": self.text, "attributes": self.attributes,
                "deleted": self.deleted}


@dataclass(frozen=True)
class Upsert:
    item_id: str
    text: str | None
    attributes: dict[str, list[str]] | None
    candidates: list[int] | None  # packed SIDs, best first; None: keep the item's SID (attributes only)
    base_sid: int | None  # the item's bundle SID, None for an item not in the bundle
    embedding: str | None = None  # encode_embedding of the text's vector (the cold-start blend reads it)


@dataclass(frozen=True)
class WriteResult:
    version: int  # the catalogue version after the write (unchanged when nothing was written)
    states: list[ItemState]
    unknown: list[str]  # ids neither in the bundle nor added (delete / restore / attribute updates)


@dataclass(frozen=True)
class Change:
    position: str  # where to read on from (a stream id, or the version in process)
    version: int
    states: list[ItemState]


@dataclass(frozen=True)
class Snapshot:
    position: str
    version: int
    states: list[ItemState]


def encode_embedding(vector: np.ndarray) -> str:
    """A text embedding as it travels through the store and its log: float16, base64 (1 KB at 384-d)."""
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def decode_embedding(raw: str | None) -> np.ndarray | None:
    """float32 vector of an `encode_embedding` string; None for none or a malformed one."""
    if not raw:
        return None
    try:
        return np.frombuffer(base64.b64decode(raw, validate=True), dtype="<f2").astype(np.float32)
    except (ValueError, TypeError):
        return None


def _state(item_id: str, sid: Any, rec: Any, deleted: Any) -> ItemState:
    r = json.loads(rec) if rec else {}
    return ItemState(str(item_id), int(sid) if sid not in (None, "", False) else None, r.get("text"),
                     r.get("attributes"), bool(int(deleted)) if deleted not in (None, "") else False, r.get("emb"))


def _rec(text: str | None, attributes: dict | None, embedding: str | None = None) -> str:
    rec: dict[str, Any] = {"text": text, "attributes": attributes}
    if embedding:
        rec["emb"] = embedding
    return json.dumps(rec, separators=(",", ":"))


class CatalogueStore(ABC):
    backend = "abstract"

    @abstractmethod
    async def upsert(self, items: Sequence[Upsert]) -> WriteResult:
        """Add or update items atomically; raises SidSpaceFull (nothing written) naming an item
        none of whose candidates is free."""

    @abstractmethod
    async def set_deleted(self, item_ids: Sequence[str], deleted: bool, base_sids: dict[str, int]) -> WriteResult:
        """Delete (or restore) items; `base_sids` names the bundle items among them."""

    @abstractmethod
    async def get(self, item_ids: Sequence[str]) -> dict[str, ItemState]:
        """The catalogue-layer state of the given ids (absent: never changed since the bundle)."""

    @abstractmethod
    async def version(self) -> int: ...

    @abstractmethod
    async def snapshot(self) -> Snapshot: ...

    @abstractmethod
    async def read_changes(self, position: str, block_s: float) -> list[Change]:
        """Entries after `position`, waiting up to block_s for the first; [] when none came."""

    async def close(self) -> None:
        return None


class InProcessCatalogueStore(CatalogueStore):
    """The same semantics in one process (one replica): dicts, and a bounded in-memory log."""

    backend = "in_process"

    def __init__(self, base_owner: dict[int, str], max_log: int = 100_000) -> None:
        self._base = base_owner  # packed bundle SID -> item id (read only)
        self.rec: dict[str, str] = {}
        self.sid: dict[str, int] = {}
        self.owner: dict[int, str] = {}
        self.deleted: set[str] = set()
        self._version = 0
        self._log: deque[Change] = deque(maxlen=max_log)
        self._changed = asyncio.Condition()

    def resolve(self, packed: int) -> str | None:
        """The final gate of the in-process index: the live item holding a SID, or None."""
        iid = self.owner.get(packed)
        if iid is None:
            iid = self._base.get(packed)
        if not iid or iid in self.deleted:
            return None
        return iid

    def _holder(self, packed: int) -> str | None:
        iid = self.owner.get(packed)
        return self._base.get(packed) if iid is None else (iid or None)

    def _cur(self, item_id: str, base_sid: int | None) -> int | None:
        return self.sid.get(item_id, base_sid)

    def _states(self, ids: Sequence[str]) -> list[ItemState]:
        return [_state(i, self.sid.get(i), self.rec.get(i), i in self.deleted) for i in ids]

    async def _commit(self, touched: list[str], unknown: list[str]) -> WriteResult:
        if not touched:
            return WriteResult(self._version, [], unknown)
        self._version += 1
        states = self._states(touched)
        self._log.append(Change(str(self._version), self._version, states))
        async with self._changed:
            self._changed.notify_all()
        return WriteResult(self._version, states, unknown)

    async def upsert(self, items: Sequence[Upsert]) -> WriteResult:
        plan, claimed, unknown = [], set(), []
        for it in items:  # pass 1: claim, all or nothing (no await: atomic on the event loop)
            cur = self._cur(it.item_id, it.base_sid)
            chosen = cur
            if it.candidates and cur not in it.candidates:
                chosen = next((c for c in it.candidates if c not in claimed
                               and self._holder(c) in (None, it.item_id)), None)
                if chosen is None:
                    raise SidSpaceFull(f"item {it.item_id}: every SID of its code prefix is taken")
            if chosen is None:
                unknown.append(it.item_id)
                continue
            claimed.add(chosen)
            plan.append((it, cur, chosen))
        for it, cur, chosen in plan:
            if chosen != cur:
                if cur is not None:
                    if cur == it.base_sid:
                        self.owner[cur] = ""
                    else:
                        self.owner.pop(cur, None)
                self.owner[chosen] = it.item_id
                self.sid[it.item_id] = chosen
            self.rec[it.item_id] = _rec(it.text, it.attributes, it.embedding)
        return await self._commit([p[0].item_id for p in plan], unknown)

    async def set_deleted(self, item_ids: Sequence[str], deleted: bool, base_sids: dict[str, int]) -> WriteResult:
        touched, unknown = [], []
        for i in item_ids:
            if i not in base_sids and i not in self.sid:
                unknown.append(i)
                continue
            (self.deleted.add if deleted else self.deleted.discard)(i)
            touched.append(i)
        return await self._commit(touched, unknown)

    async def get(self, item_ids: Sequence[str]) -> dict[str, ItemState]:
        return {s.item_id: s for s in self._states([i for i in item_ids
                                                     if i in self.rec or i in self.sid or i in self.deleted])}

    async def version(self) -> int:
        return self._version

    async def snapshot(self) -> Snapshot:
        ids = sorted(set(self.rec) | set(self.sid) | self.deleted)
        return Snapshot(str(self._version), self._version, self._states(ids))

    async def read_changes(self, position: str, block_s: float) -> list[Change]:
        after = int(position)
        if self._version <= after:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._version > after), block_s)
                except asyncio.TimeoutError:
                    return []
        return [c for c in self._log if c.version > after]


# --- Redis ---------------------------------------------------------------------------------------

# KEYS: rec, sid, owner, deleted, version, log. ARGV: maxlen, ops JSON.
# op: {t = "u" | "d" | "r", id, base = packed bundle SID or "", rec = JSON, cands = [{p, b, f}, ...]}
# with b, f the bundle bucket key and field of candidate p (service.index layout).
_WRITE_LUA = """
local ops = cjson.decode(ARGV[2])
local plan, claimed, unknown, full = {}, {}, {}, {}
for i, op in ipairs(ops) do
  local cur = redis.call('HGET', KEYS[2], op.id)
  if not cur and op.base ~= '' then cur = op.base end
  if not cur and op.t ~= 'u' then
    table.insert(unknown, op.id)
  else
    local chosen = cur
    if op.t == 'u' and op.cands and #op.cands > 0 then
      local keep = false
      if cur then for _, c in ipairs(op.cands) do if c.p == cur then keep = true break end end end
      if not keep then
        chosen = false
        for _, c in ipairs(op.cands) do
          if not claimed[c.p] then
            local o = redis.call('HGET', KEYS[3], c.p)
            if o == false then o = redis.call('HGET', c.b, c.f) end
            if o == false or o == '' or o == op.id then chosen = c.p break end
          end
        end
        if not chosen then table.insert(full, op.id) end
      end
    end
    if chosen then
      claimed[chosen] = true
      plan[#plan + 1] = {op, cur, chosen}
    elseif op.t == 'u' and not (op.cands and #op.cands > 0) then
      table.insert(unknown, op.id)
    end
  end
end
if #full > 0 then return {'full', cjson.encode(full)} end
local touched = {}
for _, p in ipairs(plan) do
  local op, cur, chosen = p[1], p[2], p[3]
  if op.t == 'u' then
    if chosen ~= cur then
      if cur then
        if cur == op.base then redis.call('HSET', KEYS[3], cur, '') else redis.call('HDEL', KEYS[3], cur) end
      end
      redis.call('HSET', KEYS[3], chosen, op.id)
      redis.call('HSET', KEYS[2], op.id, chosen)
    end
    redis.call('HSET', KEYS[1], op.id, op.rec)
  elseif op.t == 'd' then
    redis.call('SADD', KEYS[4], op.id)
  else
    redis.call('SREM', KEYS[4], op.id)
  end
  touched[#touched + 1] = op.id
end
if #touched == 0 then
  return {'ok', redis.call('GET', KEYS[5]) or '0', '', cjson.encode(unknown), '[]'}
end
local v = redis.call('INCR', KEYS[5])
local states = {}
for _, id in ipairs(touched) do
  states[#states + 1] = {id, redis.call('HGET', KEYS[2], id) or '', redis.call('HGET', KEYS[1], id) or '',
                         redis.call('SISMEMBER', KEYS[4], id)}
end
local payload = cjson.encode(states)
local pos = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[1], '*', 'v', v, 's', payload)
return {'ok', tostring(v), pos, cjson.encode(unknown), payload}
"""

# KEYS: rec, sid, deleted, version, log -> {version, last stream id, sid pairs, rec pairs, deleted}
_SNAPSHOT_LUA = """
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local pos = '0-0'
if #last > 0 then pos = last[1][1] end
return {redis.call('GET', KEYS[4]) or '0', pos, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[1]),
        redis.call('SMEMBERS', KEYS[3])}
"""


def catalogue_keys(namespace: str, version: str) -> dict[str, str]:
    p = keys(namespace, version)["cat_prefix"]
    return {k: p + k for k in ("rec", "sid", "owner", "deleted", "version", "log")}


def _list(raw: str) -> list:
    out = json.loads(raw) if raw else []
    return out if isinstance(out, list) else []  # cjson encodes an empty table as {}


class RedisCatalogueStore(CatalogueStore):
    backend = "redis"

    def __init__(self, client, namespace: str, version: str, codec: SidCodec, max_log: int = 100_000,
                 follow_client=None, write_client=None) -> None:
        self.client = client  # redis.asyncio.Redis, decode_responses=True
        self.follow_client = follow_client or client  # a blocking XREAD needs a longer socket timeout
        self.write_client = write_client or client  # so does a 1,000-item write under load
        self.keys = catalogue_keys(namespace, version)
        self.bucket_prefix = f"{namespace}:{version}:sid:"
        self.codec = codec
        self.max_log = max_log
        self._write = self.write_client.register_script(_WRITE_LUA)
        self._snap = client.register_script(_SNAPSHOT_LUA)

    def _cand(self, p: int) -> dict[str, str]:
        b, f = self.codec.split(p)
        return {"p": str(p), "b": self.bucket_prefix + str(b), "f": f}

    async def _run(self, ops: list[dict]) -> WriteResult:
        k = self.keys
        out = await self._write(keys=[k["rec"], k["sid"], k["owner"], k["deleted"], k["version"], k["log"]],
                                args=[self.max_log, json.dumps(ops)])
        if out[0] == "full":
            first = _list(out[1])[0]
            raise SidSpaceFull(f"item {first}: every SID of its code prefix is taken")
        states = [_state(*s) for s in _list(out[4])]
        return WriteResult(int(out[1]), states, [str(x) for x in _list(out[3])])

    async def upsert(self, items: Sequence[Upsert]) -> WriteResult:
        ops = [{"t": "u", "id": it.item_id, "base": "" if it.base_sid is None else str(it.base_sid),
                "rec": _rec(it.text, it.attributes, it.embedding),
                "cands": [self._cand(p) for p in (it.candidates or [])]}
               for it in items]
        return await self._run(ops)

    async def set_deleted(self, item_ids: Sequence[str], deleted: bool, base_sids: dict[str, int]) -> WriteResult:
        t = "d" if deleted else "r"
        return await self._run([{"t": t, "id": i, "base": str(base_sids[i]) if i in base_sids else ""}
                                for i in item_ids])

    async def get(self, item_ids: Sequence[str]) -> dict[str, ItemState]:
        if not item_ids:
            return {}
        k = self.keys
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(k["sid"], list(item_ids))
            pipe.hmget(k["rec"], list(item_ids))
            pipe.smismember(k["deleted"], list(item_ids))
            sids, recs, dels = await pipe.execute()
        return {i: _state(i, s, r, d) for i, s, r, d in zip(item_ids, sids, recs, dels) if s or r or d}

    async def version(self) -> int:
        return int(await self.client.get(self.keys["version"]) or 0)

    async def snapshot(self) -> Snapshot:
        k = self.keys
        v, pos, sid_pairs, rec_pairs, deleted = await self._snap(
            keys=[k["rec"], k["sid"], k["deleted"], k["version"], k["log"]])
        sids = dict(zip(sid_pairs[::2], sid_pairs[1::2]))
        recs = dict(zip(rec_pairs[::2], rec_pairs[1::2]))
        dels = set(deleted)
        ids = sorted(set(sids) | set(recs) | dels)
        return Snapshot(pos, int(v), [_state(i, sids.get(i), recs.get(i), i in dels) for i in ids])

    async def read_changes(self, position: str, block_s: float) -> list[Change]:
        reply = await self.follow_client.xread({self.keys["log"]: position}, count=1000,
                                               block=max(1, int(block_s * 1000)))
        out = []
        for _stream, entries in reply or []:
            for eid, fields in entries:
                out.append(Change(eid, int(fields["v"]), [_state(*s) for s in _list(fields["s"])]))
        return out

    async def close(self) -> None:
        for extra in {id(c): c for c in (self.follow_client, self.write_client) if c is not self.client}.values():
            await extra.aclose()
