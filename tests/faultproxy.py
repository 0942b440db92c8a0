"""A loopback TCP proxy that injects network faults between the service and a backend."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

PASS = "pass"  # forward both ways
REFUSE = "refuse"  # reset every new connection at once
STALL = "stall"  # accept, swallow the request, never answer
RESET_AFTER_REQUEST = "reset"  # forward the request, then reset instead of answering


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN, as a crashed peer or a middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class FaultProxy:
    """Listens on 127.0.0.1; `mode` chooses what happens to connections made from then on."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.mode = PASS
        self.answered = 0  # bytes the upstream sent back, all connections together
        self.answers_left: int | None = None  # see `cut_answers_after`
        self._counting = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()
        return f"http://{host}:{port}"

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._sockets.append(client)
            mode = self.mode
            if mode == REFUSE:
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str):
        if mode == STALL:
            with contextlib.suppress(OSError):
                while client.recv(65536):
                    pass
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _reset(client)
            return
        self._sockets.append(upstream)
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, mode)

    def _pump(self, source: socket.socket, target: socket.socket, mode: str | None):
        """Copy bytes source -> target; in RESET_AFTER_REQUEST mode, the upstream's first
        answer bytes make us reset the client instead (the request was processed)."""
        try:
            while data := source.recv(65536):
                if mode == RESET_AFTER_REQUEST:
                    _reset(target)
                    return
                cut = False
                if mode is not None:  # the upstream's answer
                    with self._counting:
                        self.answered += len(data)
                        if self.answers_left is not None:
                            cut = len(data) > self.answers_left
                            data = data[: self.answers_left]
                            self.answers_left -= len(data)
                target.sendall(data)
                if cut:  # an orderly close: what was sent arrives, then the end
                    for sock in (target, source):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def cut_answers_after(self, size: int) -> None:
        """From now on, on every connection, forward `size` more bytes of answers in all,
        then close both sides: a backend that goes away in the middle of a response."""
        with self._counting:
            self.answers_left = size

    def close(self):
        self._stop.set()
        self._thread.join()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
