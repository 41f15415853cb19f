"""Routing: which upstream deployment serves a request for a model."""

from metergate.routing.router import Deployment, Route, Router

__all__ = ["Deployment", "Route", "Router"]
