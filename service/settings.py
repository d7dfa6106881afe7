"""Service settings: the one pydantic-settings `Settings` (env prefix `SIDREC_`), passed explicitly.

Every knob of the HTTP service lives here, with the reason for its default beside it. Nothing
reads the environment anywhere else; `create_app(settings)` and the CLI receive a `Settings`.
This module is not the model or training configuration (see `model.config`, `training`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIDREC_", extra="ignore", frozen=True)

    # --- bundle and engine ---------------------------------------------------------------------
    bundle_path: str = "bundles/demo"
    device: str = "cpu"
    # "auto": bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), fp32 elsewhere
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    beam_step: Literal["auto", "reference", "triton"] = "auto"
    # torch intra-op threads; None keeps torch's default (all cores). With --workers N on a
    # shared host set this to cores // N so the workers do not oversubscribe the CPU.
    num_threads: int | None = Field(default=None, ge=1)
    warmup: bool = True  # one decode at startup so the first user request is not the slow one
    # Run the engine in a child process (as vLLM's EngineCore): its Python beam loop then does not
    # starve the event loop of the GIL. False keeps it on a thread of this process (tests, debugging).
    engine_process: bool = True

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"  # loopback by default; containers set 0.0.0.0 explicitly
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # 1 MiB: a 64-user batch of 20-item histories is ~30 KB and a maximal single request
    # (512 ids of 128 chars) ~70 KB; anything near 1 MiB is a mistake or abuse.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    admin_token: SecretStr | None = None  # unset -> admin endpoints answer 403 admin_disabled

    # --- request limits (every size is bounded) --------------------------------------------------
    max_history_len: int = Field(default=512, ge=1)  # ids accepted; the model keeps its last max_history
    max_item_id_len: int = Field(default=128, ge=1)
    default_top_n: int = Field(default=10, ge=1)
    max_top_n: int = Field(default=256, ge=1)
    default_beam_width: int = Field(default=100, ge=1)
    max_beam_width: int = Field(default=1024, ge=1)  # the engine's own hard limit is larger
    max_batch_requests: int = Field(default=64, ge=1)  # users per /v1/recommend/batch call
    max_candidates: int = Field(default=1000, ge=1)  # items per /v1/score call
    max_exclude: int = Field(default=1000, ge=0)  # extra excluded ids per request
    max_admin_items: int = Field(default=10_000, ge=1)  # ids per mask call

    # --- dynamic batching -----------------------------------------------------------------------
    batching: bool = True  # False: every request is its own engine call (still one at a time)
    max_batch_size: int = Field(default=32, ge=1)  # requests per engine call
    # 2 ms: long enough to catch requests arriving together, short next to a ~40 ms beam-256 decode.
    max_queue_delay_ms: float = Field(default=2.0, ge=0.0)
    # Cap on batch_size x widest beam per engine call: bounds the KV cache and logits memory.
    max_batch_beams: int = Field(default=16_384, ge=1)
    max_queue_size: int = Field(default=256, ge=1)  # queued requests before 429
    # Queued work before 429, in beam units (service.batcher: sum of beam widths or candidates, at
    # least 16 per user). None: max_queue_size x default_beam_width, the old bound counted in
    # typical requests; a 64-user batch at beam 1,024 now weighs 640 beam-100 requests.
    max_queue_work: int | None = Field(default=None, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0.0)  # per-request deadline -> 504

    # --- engine watchdog (engine_process=True; service.watchdog) ----------------------------------
    # A call may take 3 s + 10 x its expected time (measured seconds per beam x its beams) before
    # the engine counts as hung; an idle engine is pinged every second and must answer in 3 s. So a
    # stopped or dead engine is found in ~1-4 s, well inside the 30 s request deadline.
    engine_hang_timeout_s: float = Field(default=3.0, gt=0.0)
    engine_hang_slack: float = Field(default=10.0, ge=1.0)
    engine_ping_interval_s: float = Field(default=1.0, gt=0.0)
    # Restarts failing this many times in a row make /healthz fail (the pod is then replaced).
    engine_max_restart_failures: int = Field(default=3, ge=1)

    # --- inverse index (SID -> item id) ----------------------------------------------------------
    redis_url: str | None = None  # unset -> the in-process index (embedded default)
    redis_namespace: str = Field(default="sidrec", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    redis_timeout_s: float = Field(default=2.0, gt=0.0)
    # Load this bundle's SID map into Redis at startup when its version is missing there
    # (idempotent; `python -m sidrec.service index load` does the same ahead of a rollout).
    redis_autoload: bool = True
    mask_sync_interval_s: float = Field(default=2.0, gt=0.0)  # workers pick up masks shared via Redis

    # --- the living catalogue (service.catalogue_store) -------------------------------------------
    max_items_per_write: int = Field(default=1000, ge=1, le=1000)  # items per POST /v1/items
    max_item_text_len: int = Field(default=4096, ge=1, le=8192)  # characters; MiniLM reads ~256 tokens anyway
    max_item_attributes: int = Field(default=32, ge=0, le=64)
    max_attribute_values: int = Field(default=64, ge=1, le=1000)  # values per attribute of an item
    max_filter_values: int = Field(default=1000, ge=1)  # allowed values across a request's filter
    # Change-log entries Redis keeps (XADD MAXLEN ~): a replica further behind resyncs from a snapshot.
    catalogue_log_maxlen: int = Field(default=100_000, ge=10)
    catalogue_block_s: float = Field(default=1.0, gt=0.0, le=10.0)  # XREAD BLOCK per follower read
    # Socket timeout of catalogue writes: one call claims up to 1,000 items and logs their records
    # (~1.4 MB with embeddings); under a saturated CPU that outlasted redis_timeout_s (2 s).
    catalogue_write_timeout_s: float = Field(default=15.0, gt=0.0, le=120.0)
    # How long a write waits for this replica's own engine to apply it (read-your-writes).
    catalogue_apply_wait_s: float = Field(default=1.0, ge=0.0)

    # Items added at run time are cold (no interactions): 'dense' blends their text-space similarity
    # to the history into the ranking (model/cold_start.py; tuned on Beauty validation), 'prefix'
    # lets them inherit their parent prefix's probability, 'off' serves the beam's ranking alone.
    cold_start: Literal["off", "dense", "prefix"] = "dense"
    # The hybrid re-rank of the beam's items by text similarity to the history (model/cold_start.py).
    # None: the weight the bundle's training run chose on validation; 0 turns it off.
    rerank_weight: float | None = Field(default=None, ge=0.0, le=1000.0)
    # The transition mixture: p(SID) mixed with p(next item) from the bundle's transition table
    # (model/transitions.py). None: the weight the bundle's training run chose; 0 turns it off.
    transitions_weight: float | None = Field(default=None, ge=0.0, lt=1.0)

    # Model lifecycle (service.lifecycle): load a new version beside the running one, switch, roll back.
    # Bundles an admin reload may name must lie under this folder (None: the parent of bundle_path).
    bundle_root: str | None = None
    reload_headroom_mb: int = Field(default=256, ge=0)  # memory left over once both models are loaded
    keep_previous_model: bool = True  # keep the old slot loaded after a switch: rollback is instant
    reload_drain_s: float = Field(default=30.0, gt=0.0)  # wait this long for requests on a replaced slot
    # SIGHUP reloads bundle_path (one worker only: with several, uvicorn's supervisor owns the signal)
    reload_on_sighup: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.default_beam_width > self.max_beam_width:
            raise ValueError(f"default_beam_width {self.default_beam_width} exceeds max_beam_width {self.max_beam_width}")
        if self.default_top_n > min(self.max_top_n, self.default_beam_width):
            raise ValueError(f"default_top_n {self.default_top_n} must be <= max_top_n and default_beam_width")
        return self

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())
