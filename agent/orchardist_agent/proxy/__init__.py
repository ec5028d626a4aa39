"""The authenticating proxy in front of each replica's engine.

`policy` decides what may reach an engine (pure), `server` listens on the Mac's address and
forwards to the engine on loopback, `stats` counts what each replica's proxy saw.
"""

from __future__ import annotations

from orchardist_agent.proxy.policy import Route
from orchardist_agent.proxy.server import ProxyServer
from orchardist_agent.proxy.stats import ProxyStats

__all__ = ["ProxyServer", "ProxyStats", "Route"]
