"""A TCP proxy on loopback that the suite can cut: a database (or any server) going away.

Run as a script it forwards from another network namespace to a server of this one, until
killed: `python -m tests.proxy NAMESPACE LISTEN-ADDRESS PORT TARGET-ADDRESS TARGET-PORT` (a
host made of a namespace reaching the machine's PostgreSQL, tests/test_machines.py).
"""

import contextlib
import socket
import sys
import threading

from tests.namespaces import inside


class TcpProxy:
    """Forwards connections to a server; `cut()` drops them all and refuses new ones until
    `restore()`, as an unreachable server would."""

    def __init__(self, host: str, port: int, listener: socket.socket | None = None) -> None:
        self.target = (host, port)
        self.listener = listener or socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # 5 s to connect; once connected, as quiet as the client likes
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def forward_from_namespace(namespace: str, address: str, port: int, target: str, target_port: int) -> None:
    """Listen on the namespace's address, connect to the target from this namespace; forever."""
    with inside(namespace):
        listener = socket.create_server((address, port), backlog=128)
    TcpProxy(target, target_port, listener)
    threading.Event().wait()


if __name__ == "__main__":
    namespace, address, port, target, target_port = sys.argv[1:]
    forward_from_namespace(namespace, address, int(port), target, int(target_port))
