"""Ports: the public one a server binds, loopback ones for the processes deploykit starts (engines,
load-generator workers), and what counts as loopback."""

from __future__ import annotations

import errno
import ipaddress
import socket

from deploykit.core.errors import PortInUseError, UsageError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, shared: bool = False) -> socket.socket:
    """Bind the public port now, so that a port in use fails before a minute of engine start-up. `shared`: the
    first of several gateway processes; the others `join` it (SO_REUSEPORT: the kernel spreads new connections
    over their sockets by address, where one shared socket hands a burst to whichever process wakes first)."""
    sock = _bound(host, port, reuse_port=False)  # any holder, our own kind included, makes this a port in use
    if not shared:
        return sock
    port = sock.getsockname()[1]  # the one the kernel chose, for port 0
    sock.close()
    return join(host, port)


def join(host: str, port: int) -> socket.socket:
    """Listen on a port that the first of several gateway processes bound with `bind(..., shared=True)`."""
    return _bound(host, port, reuse_port=True)


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from e
        raise UsageError(f"Cannot listen on {host}:{port}: {e.strerror}.", "Check --host and --port.") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
