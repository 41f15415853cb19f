"""One rollout as the hot path sees it: its stage, its weight and which side serves."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from metergate.config.model import RolloutConfig
from metergate.rollout.stats import TURNED_AWAY, WindowStats

PENDING, RUNNING, PAUSED, COMPLETED, ROLLED_BACK = (
    "pending",
    "running",
    "paused",
    "completed",
    "rolled_back",
)


@dataclass(slots=True, eq=False)
class Rollout:
    name: str
    config: RolloutConfig
    state: str = PENDING
    stage: int = 0
    stage_started_at: float = field(default_factory=time.time)
    failures: int = 0
    candidate_stats: WindowStats = field(default_factory=WindowStats)
    baseline_stats: WindowStats = field(default_factory=WindowStats)
    last_judgment: dict[str, Any] = field(default_factory=dict)
    # The database row's version this object was loaded at (0: no row yet); a save is a
    # compare-and-set on it. `lock` makes this process's load-check-save take turns.
    version: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def active(self) -> bool:
        """Does this rollout decide where the model's traffic goes?"""
        return self.state != PENDING

    @property
    def in_progress(self) -> bool:
        """Are both sides in play (running or paused, at any stage, 100 % included)? The
        baseline then serves what the candidate fails or its open circuits turn away."""
        return self.state in (RUNNING, PAUSED)

    @property
    def weight(self) -> float:
        """The candidate's share of traffic, 0..1."""
        if self.in_progress:
            return self.config.stages[self.stage] / 100
        return 1.0 if self.state == COMPLETED else 0.0

    def to_candidate(self, affinity: str | None) -> bool:
        """Route this request to the candidate? Sticky callers hash to a stable side."""
        weight = self.weight
        if weight <= 0 or weight >= 1:
            return weight >= 1
        if affinity is None:
            return random.random() < weight
        digest = hashlib.blake2b(f"{self.name}\0{affinity}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < weight

    def observe(self, upstream: str, outcome: str, seconds: float) -> None:
        if self.state != RUNNING:
            return
        if upstream in self.config.candidate:
            self.candidate_stats.observe(outcome, seconds)
        elif upstream in self.config.baseline:
            self.baseline_stats.observe(outcome, seconds)

    def turned_away(self) -> None:
        """A request meant for the candidate found every candidate circuit open: a
        failed candidate attempt, so a candidate that fails behind its open circuit is
        judged on the traffic it refuses rather than on the odd probe."""
        if self.state == RUNNING:
            self.candidate_stats.observe(TURNED_AWAY, 0.0)

    def reset_window(self) -> None:
        self.candidate_stats = WindowStats()
        self.baseline_stats = WindowStats()

    def next_decision_at(self) -> float:
        start = max(self.stage_started_at, float(self.last_judgment.get("at") or 0))
        return start + self.config.interval_seconds
