"""Staged rollouts: shift a model's traffic from baseline to candidate upstreams, judge
each stage against gates, promote, hold, or roll back by itself."""

from metergate.rollout.controller import RolloutController
from metergate.rollout.state import Rollout

__all__ = ["Rollout", "RolloutController"]
