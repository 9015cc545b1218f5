"""A TCP proxy for tests: forwards to a server, and breaks connections when told to.

It can cut every live connection (a real TCP break), hold new connections off or refuse
them (as a server that is down would) until it is released, and drop the server's answer
to the next request by closing the connection at the moment that answer starts: it reads
the server's bytes as HTTP/2 frames and, when armed, closes both sockets instead of
forwarding the first HEADERS frame of a stream. Of any protocol, it can let a request
through and hold back everything the server answers after it (`hold_answer`), until the
connection is cut.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

_FRAME_HEADER = 9  # 3-byte length, type, flags, 4-byte stream id
_HEADERS = 0x1


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.flowing = threading.Event()  # cleared: nothing is forwarded (Proxy.stall)
        self.flowing.set()
        self.answering = threading.Event()  # cleared: nothing more reaches the client
        self.answering.set()
        self.client = client
        self.server = server
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()  # first: a pump woken below forwards nothing (see _pump_*)
        self.flowing.set()  # a stalled or held pump wakes, and stops
        self.answering.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Proxy:
    """Listens on 127.0.0.1 (a port of its own) and forwards each connection to `upstream`."""

    def __init__(self, upstream: str, *, opaque: bool = False) -> None:
        """`opaque`: forward the bytes as they come, without reading HTTP/2 frames in them
        (TLS, whose records are not frames; `drop_next_answer` then does nothing)."""
        self._opaque = opaque
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0  # connections accepted so far
        self._accepted = threading.Condition()
        self.dropped_answers = 0
        self._open = threading.Event()
        self._open.set()
        self._refusing = False

        self._closing = False
        self._drop_armed = False
        self._hold: tuple[bytes, threading.Event] | None = None
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def cut(self) -> None:
        """Close every live connection, as a network failure would."""
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()

    def hold(self) -> None:
        """Accept new connections but forward nothing until `release`."""
        self._open.clear()

    def refuse(self) -> None:
        """Cut every live connection and close each new one at once, as a server that is
        down would, until `release`."""
        self._refusing = True
        self.cut()

    def release(self) -> None:
        self._refusing = False
        self._open.set()

    def stall(self) -> None:
        """Keep every live connection open but forward nothing on it, as a silent network
        partition would, until `resume` (new connections are not affected)."""
        with self._lock:
            for link in self._links:
                link.flowing.clear()

    def resume(self) -> None:
        with self._lock:
            for link in self._links:
                link.flowing.set()

    def wait_for_connections(self, count: int, timeout: float = 30) -> bool:
        """Wait until `count` connections in all have been accepted (held ones included)."""
        with self._accepted:
            return self._accepted.wait_for(lambda: self.connections >= count, timeout)

    def drop_next_answer(self) -> None:
        """Close the connection that carries the next answer, just before it reaches the client."""
        with self._lock:
            self._drop_armed = True

    def hold_answer(self, request: bytes) -> threading.Event:
        """Forward the next bytes a client sends that contain `request`, and from then on
        nothing the server sends back on that connection, as if the network failed just as
        the request went; `cut` closes it, and what was held back never reaches the client.
        The event is set once the request went on."""
        sent = threading.Event()
        with self._lock:
            self._hold = (request, sent)
        return sent

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        self.release()
        self.resume()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            with self._accepted:
                self.connections += 1
                self._accepted.notify_all()
            self._spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()
        if self._refusing:
            client.close()
            return
        try:
            server = socket.create_connection(self._upstream)
        except OSError:
            client.close()
            return
        link = _Link(client, server)
        with self._lock:
            if self._closing:
                link.close()
                return
            self._links.add(link)
        self._spawn(self._pump_to_server, link)
        self._pump_to_client(link)

    def _pump_to_server(self, link: _Link) -> None:
        while data := _receive(link.client):
            link.flowing.wait()
            if link.closed:  # stalled until the cut: what came meanwhile never goes
                break
            held = self._take_hold(data)
            if held is not None:  # before the request goes, so that no answer to it slips by
                link.answering.clear()
            if not _send(link.server, data):
                break
            if held is not None:
                held.set()
        link.close()

    def _pump_to_client(self, link: _Link) -> None:
        pending = b""
        while data := _receive(link.server):
            link.flowing.wait()
            link.answering.wait()
            # Woken by the cut (close sets the events to end this thread): what was stalled
            # or held back never reaches the client, though its socket is still open until
            # close shuts it down a moment later.
            if link.closed:
                break
            pending += data
            if self._opaque:
                forward, pending, drop = pending, b"", False
            else:
                forward, pending, drop = self._split_at_answer(pending)
            if forward and not _send(link.client, forward):
                break
            if drop:
                break
        link.close()

    def _split_at_answer(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(whole frames to forward, the incomplete rest, whether to drop the connection now)."""
        offset = 0
        while len(data) - offset >= _FRAME_HEADER:
            length = int.from_bytes(data[offset : offset + 3], "big")
            end = offset + _FRAME_HEADER + length
            if end > len(data):
                break
            frame_type = data[offset + 3]
            stream = int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFF_FFFF
            if frame_type == _HEADERS and stream != 0 and self._take_drop():
                return data[:offset], b"", True
            offset = end
        return data[:offset], data[offset:], False

    def _take_hold(self, data: bytes) -> threading.Event | None:
        with self._lock:
            if self._hold is None or self._hold[0] not in data:
                return None
            _, sent = self._hold
            self._hold = None
            return sent

    def _take_drop(self) -> bool:
        with self._lock:
            armed, self._drop_armed = self._drop_armed, False
            if armed:
                self.dropped_answers += 1
            return armed


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True
