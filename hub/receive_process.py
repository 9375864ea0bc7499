"""Start, watch and stop the hub's receive process from the worker's main process."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

from mailyard.processes import die_with_parent

log = logging.getLogger("mailyard.hub.receive")


class ReceiveProcess:
    def __init__(self, *, hub: str, site: str, redis_url: str, data_dir: Path, binds: list[str]) -> None:
        self.cmd = [sys.executable, "-m", "mailyard", "receive", "--hub", hub, "--site", site,
                    "--redis-url", redis_url, "--data-dir", str(data_dir)]
        for bind in binds:
            self.cmd += ["--bind", bind]
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="receive-watch", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        # Output goes where the hub's goes; the process dies with the hub (PDEATHSIG).
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stop.wait(0.5):
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("receive process exited with status %s; restarting in %.1fs",
                            self.proc.returncode, backoff)
                if self._stop.wait(backoff):
                    return
                self._spawn()
                backoff = min(backoff * 2, 30.0)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
