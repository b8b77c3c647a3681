"""Development tools: never imported by ``keyconnector serve``.

They exist so that tests, ``make demo`` and the benchmarks run against real HTTP endpoints instead of
mocks, which is where discovery, key rotation and outage handling actually get exercised.
"""

from keyconnector.devtools.issuer import DevIssuer

__all__ = ["DevIssuer"]
