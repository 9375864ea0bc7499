"""The Celery app Flower loads (``celery -A mailyard.flower flower``), from the environment.

Flower's basic auth (``FLOWER_BASIC_AUTH``, which ``mailyard site up`` always sets) covers its
pages and REST API but not its own ``/metrics`` (worker and task names, counts), which Flower
serves to anyone; ``logon_for_metrics`` puts that page behind the same logon. Without basic
auth (``mailyard flower`` on loopback) nothing changes: Flower then lets everyone in anyway.
"""

from typing import Any

from mailyard import redisconn
from mailyard.broker import make_app


def logon_for_metrics() -> None:
    """Make Flower's /metrics ask for the logon its other pages ask for (idempotent)."""
    try:
        from flower.views.monitor import Metrics
        from tornado.web import authenticated
    except ImportError:  # no Flower here: nothing to protect
        return
    get: Any = Metrics.get
    if getattr(get, "_mailyard_logon", False):
        return
    # Flower's get_current_user answers 401 itself for missing or wrong basic-auth credentials.
    protected: Any = authenticated(get)
    protected._mailyard_logon = True
    Metrics.get = protected


logon_for_metrics()
# MAILYARD_REDIS_URL holds Redis's password (or MAILYARD_REDIS_PASSWORD_FILE names a file that does).
app = make_app(redisconn.url_from_env("redis://127.0.0.1:6379/0") or "redis://127.0.0.1:6379/0")
