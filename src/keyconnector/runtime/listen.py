"""The listening socket: bound once, by ``serve``'s parent, before anything is written.

granian on Linux lets every worker bind the port itself with ``SO_REUSEPORT``. That option is not
limited to one server's workers: any other process of the same user that sets it (a second
``keyconnector serve`` started by mistake, the new instance of a takeover next to the old one)
binds the same port too, and the kernel then splits the connections between them, so that half of
the logins meet the other instance's settings and database. Nobody notices until it hurts.

So the parent binds the port here, without ``SO_REUSEPORT``, and the workers serve on that one
socket, inherited from the parent. A second server on the port fails at bind with one clear line,
and the first keeps all the traffic. ``SO_REUSEADDR`` stays on: on Linux it does not allow a second
listener, it only lets a restarted service bind while old connections linger in ``TIME_WAIT``.

The socket listens from the moment it is bound, before the pre-flight (migrations, data key):
holding it earlier is what makes the port ours. Connections that arrive meanwhile wait in the
backlog and are answered when the workers start.
"""

from __future__ import annotations

import errno
import multiprocessing.reduction
import os
import socket
from dataclasses import dataclass
from typing import Any

from keyconnector.errors import UsageError

BACKLOG = 1024
"""granian's own default backlog, so that handing it our socket changes nothing else."""


@dataclass(frozen=True)
class Listen:
    """Where to listen, and which option or variable said so (named in every error about it)."""

    host: str
    port: int
    https: bool
    source: str = "--port"


def check_port(port: int, source: str) -> None:
    """A port outside 1-65535 is refused by name, before anything else happens."""
    if not 1 <= port <= 65535:
        raise UsageError(source, f"{port} is not a TCP port; use a number from 1 to 65535")


def bind(listen: Listen) -> socket.socket:
    """The listening socket for ``listen``, or a ``UsageError`` that names the option and the cause.

    Busy port: the message names the address and the command that shows who holds it."""
    check_port(listen.port, listen.source)
    host_option = "--host" if listen.source == "--port" else listen.source
    try:
        found = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(
            host_option, f"cannot resolve '{listen.host}' to an address: {exc.strerror}"
        ) from None
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Upstream's "http://+:5000" means every address; "::" alone should too, not IPv6 only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise _bind_error(listen, host_option, exc) from None
    sock.set_inheritable(True)
    return sock


def _bind_error(listen: Listen, host_option: str, exc: OSError) -> UsageError:
    where = f"[{listen.host}]:{listen.port}" if ":" in listen.host else f"{listen.host}:{listen.port}"
    if exc.errno == errno.EADDRINUSE:
        return UsageError(
            listen.source,
            f"{where} is already in use by another process (another keyconnector serve?); "
            f"`ss -ltnp 'sport = :{listen.port}'` shows which; stop it or choose another port",
        )
    if exc.errno == errno.EACCES:
        return UsageError(
            listen.source,
            f"not allowed to listen on {where}: ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            "use a port above 1024 (upstream's container listens on 5000)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(host_option, f"{listen.host} is not an address of this machine")
    return UsageError(listen.source, f"cannot listen on {where}: {exc.strerror}")


def _rebuild_holder(fd: Any, backlog: int) -> Any:
    from granian._granian import SocketHolder

    # granian's stub omits the constructor: (descriptor, is a Unix socket, backlog).
    return SocketHolder(fd.detach(), False, backlog)  # type: ignore[call-arg]


def _reduce_holder(holder: Any) -> tuple[Any, tuple[Any, int]]:
    """granian pickles a socket holder as its bare descriptor number, which means nothing in a
    spawned worker; send the descriptor itself, as multiprocessing does for sockets."""
    return _rebuild_holder, (multiprocessing.reduction.DupFd(holder.get_fd()), BACKLOG)


def sharing(server_class: Any, sock: socket.socket) -> Any:
    """granian's server, serving on ``sock`` (bound by ``bind``) in every worker, respawned ones too."""
    from granian._granian import SocketHolder

    multiprocessing.reduction.ForkingPickler.register(SocketHolder, _reduce_holder)

    class SharedSocketServer(server_class):  # type: ignore[misc]
        def _init_shared_socket(self) -> None:
            self._ssp = None
            # A duplicate: the holder owns its descriptor, ``serve`` owns ``sock``.
            self._sfd = os.dup(sock.fileno())
            self._shd = SocketHolder(self._sfd, False, BACKLOG)  # type: ignore[call-arg]
            self._sso = None

        def _drop_shared_socket(self) -> None:
            """The socket is ``serve``'s, closed when ``run`` returns."""

    return SharedSocketServer
