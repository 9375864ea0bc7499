"""The Celery app Flower loads (``celery -A mailyard.flower flower``), from the environment."""

import os

from mailyard.broker import make_app

app = make_app(os.environ.get("MAILYARD_REDIS_URL", "redis://127.0.0.1:6379/0"))
