"""An HTTPS server with a certificate of its own at an Edge's EdgeSync address: counts the
requests that reach it (none must)."""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from pathlib import Path

from mailyard import pki


class Impostor:
    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.requests = 0
        self._stop = threading.Event()

    def __enter__(self) -> Impostor:
        key, cert = pki.self_signed("edge-01.edge.invalid")
        folder = Path(tempfile.mkdtemp())
        (folder / "k.pem").write_bytes(key)
        (folder / "c.pem").write_bytes(cert)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(folder / "c.pem", folder / "k.pem")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, self.port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    if tls.recv(1):
                        self.requests += 1
            except (OSError, ssl.SSLError):
                pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
