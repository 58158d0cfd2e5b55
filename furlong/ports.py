"""Free TCP ports, for process-group rendezvous and engine servers."""
from __future__ import annotations

import socket


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports nobody listens on now (to be bound a moment later).
    The sockets are held together: one closed early could hand its port out again."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]
