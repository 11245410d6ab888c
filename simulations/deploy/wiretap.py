"""A loopback TCP proxy that records what a SuperNode sends to its SuperLink, outside Flower.

The SuperNode connects to the proxy instead of the SuperLink. The proxy holds
the SuperLink's certificate and key (both from the operator's ``certs``
folder, so the SuperNode's normal certificate check against ``ca.crt``
passes), ends the node's TLS session, and opens its own TLS session to the
real SuperLink. Every byte the node puts on the wire is counted at the TCP
level, and what its TLS carries (the HTTP requests of Flower's Fleet API,
bodies included) is kept in plaintext for the wire scan.

Why a TLS-ending proxy and not the TLS session keys: Python's ``ssl`` writes
``SSLKEYLOGFILE`` only for contexts made by ``ssl.create_default_context``,
and Flower 1.41's SuperNode builds its own ``ssl.SSLContext`` from the
``--root-certificates`` bytes, so no keys are ever logged. Flower's node
authentication signs each request's content in HTTP headers and is not bound
to the TLS channel, so the SuperLink accepts the relayed requests as the
node's own. A test harness only: it holds the SuperLink's private key.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Capture:
    """One TCP connection from the node."""

    tcp_bytes: int = 0  # what the node sent on the wire (TLS records, handshake included)
    sent: bytearray = field(default_factory=bytearray)  # the plaintext inside them
    received: int = 0  # plaintext bytes relayed back to the node


class TlsWiretap:
    """``127.0.0.1:port`` -> TLS end -> record -> TLS -> ``upstream``."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path, ca: Path):
        self.upstream = upstream
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(cert), str(key))
        self.client_ctx = ssl.create_default_context(cafile=str(ca))
        self.captures: list[Capture] = []
        self.errors: list[str] = []
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="wiretap-accept", daemon=True)
        self._accept.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tcp_bytes(self) -> int:
        return sum(c.tcp_bytes for c in self.captures)

    def plaintext(self) -> list[bytes]:
        return [bytes(c.sent) for c in self.captures]

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._accept.join(timeout)
        for t in self._threads:
            t.join(timeout)
        self._listener.close()

    # -- internals ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            capture = Capture()
            self.captures.append(capture)
            t = threading.Thread(target=self._relay_safely, args=(conn, capture), name="wiretap-relay", daemon=True)
            self._threads.append(t)
            t.start()

    def _relay_safely(self, conn: socket.socket, capture: Capture) -> None:
        try:
            self._relay(conn, capture)
        except (OSError, ssl.SSLError) as err:
            self.errors.append(f"{type(err).__name__}: {err}")
        finally:
            conn.close()

    def _relay(self, node_sock: socket.socket, capture: Capture) -> None:
        link_sock = socket.create_connection(self.upstream, timeout=10)
        node_in, node_out, link_in, link_out = (ssl.MemoryBIO() for _ in range(4))
        node = self.server_ctx.wrap_bio(node_in, node_out, server_side=True)
        link = self.client_ctx.wrap_bio(link_in, link_out, server_hostname=self.upstream[0])
        to_link, to_node = bytearray(), bytearray()
        sel = selectors.DefaultSelector()
        sel.register(node_sock, selectors.EVENT_READ)
        sel.register(link_sock, selectors.EVENT_READ)
        try:
            while not self._closing.is_set():
                node_open = _pump(node, capture.sent, to_link)
                link_open = _pump(link, None, to_node)
                if to_link and _handshaken(link):
                    link.write(bytes(to_link))
                    to_link.clear()
                if to_node and _handshaken(node):
                    capture.received += len(to_node)
                    node.write(bytes(to_node))
                    to_node.clear()
                for bio, sock in ((node_out, node_sock), (link_out, link_sock)):
                    if bio.pending:
                        sock.sendall(bio.read())
                if not (node_open and link_open):
                    return
                for key, _ in sel.select(0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is node_sock:
                        capture.tcp_bytes += len(data)
                        node_in.write(data)
                    else:
                        link_in.write(data)
        finally:
            sel.close()
            link_sock.close()


def _handshaken(tls: ssl.SSLObject) -> bool:
    try:
        tls.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False


def _pump(tls: ssl.SSLObject, record: bytearray | None, forward: bytearray) -> bool:
    """Advance the handshake and move every decrypted byte into ``forward`` (and ``record``); False once the peer closed."""
    if not _handshaken(tls):
        return True
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLZeroReturnError:
            return False
        if not chunk:
            return False
        forward += chunk
        if record is not None:
            record += chunk
