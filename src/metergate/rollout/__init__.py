"""Staged rollouts: shift a model's traffic from baseline to candidate upstreams, judge
each stage against gates, promote, hold, or roll back by itself."""

from metergate.rollout.controller import RolloutController, warn_of_one_workers_judging
from metergate.rollout.state import Rollout

__all__ = ["Rollout", "RolloutController", "warn_of_one_workers_judging"]
