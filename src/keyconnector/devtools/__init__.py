"""Development tools: never imported by ``keyconnector serve``.

They exist so that tests, ``make demo`` and the benchmarks run against real HTTP endpoints instead of
mocks, which is where discovery, key rotation and outage handling actually get exercised.
"""

import socket

from keyconnector.devtools.issuer import DevIssuer


def free_port() -> int:
    """A loopback port nobody listens on now, for throwaway servers in tests, demo and benchmarks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


__all__ = ["DevIssuer", "free_port"]
