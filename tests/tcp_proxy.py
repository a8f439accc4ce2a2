"""A TCP proxy that can hold every byte in flight: one process's link to etcd partitioned while
the process itself, and everyone else's link, stay up (a router whose view then lags etcd)."""
from __future__ import annotations

import socket
import threading

from modelfleet.processes import free_port


class PausableProxy:
    """Forwards 127.0.0.1:<port> to `target` ('host:port'); `pause()` holds all traffic (new
    connections are accepted and held too) until `resume()`. A context manager: closes all on exit."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                if self.closed:
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with_shutdown(sink)

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        for sock in (self.listener, *self.sockets):
            with_shutdown(sock)
            sock.close()

    def __enter__(self) -> "PausableProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_shutdown(sock: socket.socket) -> None:
    """Ends both directions (wakes a thread blocked in recv on it); a socket already gone is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
