"""Locust load profile of the sidrec HTTP API (used by `loadtests/run_load.py`, or locust's own UI).

Users post /v1/recommend (most traffic), /v1/recommend/batch and /v1/score with histories drawn
from the bundle's catalogue. Configured by environment variables:
  SIDREC_LOAD_BUNDLE        bundle directory whose item_ids.json supplies history ids (required)
  SIDREC_LOAD_BEAM_WIDTH    beam width per request (default 100)
  SIDREC_LOAD_TOP_N         items per request (default 10)
  SIDREC_LOAD_HISTORY       history length (default 20)
  SIDREC_LOAD_MAX_REQUESTS  stop the run after this many requests (default: no cap; time-bound)
This file only describes the traffic; it starts nothing by itself.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from locust import FastHttpUser, between, events, task

BUNDLE = os.environ.get("SIDREC_LOAD_BUNDLE", "bundles/demo")
BEAM = int(os.environ.get("SIDREC_LOAD_BEAM_WIDTH", "100"))
TOP_N = int(os.environ.get("SIDREC_LOAD_TOP_N", "10"))
HISTORY = int(os.environ.get("SIDREC_LOAD_HISTORY", "20"))
MAX_REQUESTS = int(os.environ.get("SIDREC_LOAD_MAX_REQUESTS", "0"))

ITEMS: list[str] = json.loads((Path(BUNDLE) / "item_ids.json").read_text())


_ENV: dict = {}


@events.init.add_listener
def _keep_env(environment, **_kw) -> None:
    _ENV["env"] = environment


@events.request.add_listener
def _stop_after_cap(**_kw) -> None:
    env = _ENV.get("env")
    if MAX_REQUESTS and env is not None and env.runner is not None \
            and env.runner.stats.total.num_requests >= MAX_REQUESTS:
        env.runner.quit()


class SidrecUser(FastHttpUser):
    wait_time = between(0.0, 0.01)  # closed loop: the next request leaves right after the last answer

    def history(self) -> list[str]:
        return random.sample(ITEMS, min(HISTORY, len(ITEMS)))

    @task(16)
    def recommend(self) -> None:
        self.client.post("/v1/recommend", json={"history": self.history(), "top_n": TOP_N, "beam_width": BEAM},
                         name="/v1/recommend")

    @task(1)
    def recommend_batch(self) -> None:
        reqs = [{"history": self.history(), "top_n": TOP_N, "beam_width": BEAM} for _ in range(4)]
        self.client.post("/v1/recommend/batch", json={"requests": reqs}, name="/v1/recommend/batch")

    @task(2)
    def score(self) -> None:
        self.client.post("/v1/score", json={"history": self.history(), "candidates": random.sample(ITEMS, 20)},
                         name="/v1/score")
