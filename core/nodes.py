"""The former name of ``mailyard.registry`` (the registry of hubs and mailbox servers).

Kept only because tests/faults/conftest.py still imports it and was outside the change that
renamed the module; import ``mailyard.registry`` instead. Delete this file once nothing
imports ``mailyard.nodes``.
"""

from mailyard.registry import (
    HubInfo,
    hub_endpoints,
    hub_gone,
    hub_heartbeat,
    hubs,
    live_hubs,
    now_ms,
    register_server,
    server_url,
    servers,
)

__all__ = [
    "HubInfo",
    "hub_endpoints",
    "hub_gone",
    "hub_heartbeat",
    "hubs",
    "live_hubs",
    "now_ms",
    "register_server",
    "server_url",
    "servers",
]
