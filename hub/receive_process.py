"""Moved to ``receive_listener``: the receive listener process and its supervisor.

Only ``hub/app.py`` still imports ``ReceiveProcess`` from here; once it imports
``ListenerProcess`` from ``mailyard.hub.receive_listener``, delete this module.
"""

from __future__ import annotations

from mailyard.hub.receive_listener import ListenerProcess as ReceiveProcess

__all__ = ["ReceiveProcess"]
