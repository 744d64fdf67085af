"""Forwarding policies as pure functions over observed state."""

from infscaled.routing.policies import (
    POLICIES,
    NoRouteError,
    RouteState,
    RouteView,
    choose,
    update_throughput,
)

__all__ = ["POLICIES", "NoRouteError", "RouteState", "RouteView", "choose", "update_throughput"]
