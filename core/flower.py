"""The Celery app Flower loads (``celery -A mailyard.flower flower``), from the environment.

Flower's basic auth (``FLOWER_BASIC_AUTH``, which ``mailyard site up`` always sets) covers its
pages and REST API but not its own ``/metrics`` (worker and task names, counts), which Flower
serves to anyone; ``logon_for_metrics`` puts that page behind the same logon. Flower also
takes the scheme only as ``Basic``, where RFC 7235 makes it case-insensitive (``basic``,
``BASIC``); ``basic_in_any_case`` fixes that. Without basic auth (``mailyard flower`` on
loopback) nothing changes: Flower then lets everyone in anyway.
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


def basic_in_any_case() -> None:
    """Make Flower's basic auth take the scheme in any case (idempotent)."""
    try:
        from flower.views import BaseHandler
    except ImportError:
        return
    original: Any = BaseHandler.get_current_user
    if getattr(original, "_mailyard_any_case", False):
        return

    def get_current_user(self: Any) -> Any:
        # Flower compares the scheme with "Basic" exactly: say it so, leaving the credentials to it.
        scheme, sep, credentials = self.request.headers.get("Authorization", "").partition(" ")
        if sep and scheme.lower() == "basic":
            self.request.headers["Authorization"] = f"Basic {credentials}"
        return original(self)

    get_current_user._mailyard_any_case = True  # type: ignore[attr-defined]
    BaseHandler.get_current_user = get_current_user


def harden() -> None:
    """Both of the above: what ``mailyard flower`` and Flower's loading of this module do."""
    logon_for_metrics()
    basic_in_any_case()


harden()
# MAILYARD_REDIS_URL holds Redis's password (or MAILYARD_REDIS_PASSWORD_FILE names a file that does).
app = make_app(redisconn.url_from_env("redis://127.0.0.1:6379/0") or "redis://127.0.0.1:6379/0")
