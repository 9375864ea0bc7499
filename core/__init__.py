"""Mailyard: the Exchange 2010 Hub Transport pipeline on Celery workers and Redis.

This folder (``core/`` in the repository) is installed as the ``mailyard`` package and holds
what every role shares: the organization directory, settings, the Redis key schema, the
Celery wiring, the CLI and the local site runner. The service folders of the repository
are installed beside it as ``mailyard.hub``, ``mailyard.mailbox``, ``mailyard.submission``
and ``mailyard.edge``.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "hub")):
    # Running from a source checkout (an editable install): the service folders sit beside
    # core/ rather than inside it, so the repository root joins this package's search path.
    __path__.append(_os.path.dirname(_here))
