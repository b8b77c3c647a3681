"""In which order to try the servers of a multi-host connection string: one place for both backends.

PostgreSQL (``Host=db1,db2``, Npgsql) and MySQL/MariaDB (``Server=db1,db2``, MySqlConnector) both let
an operator list several servers. Both backends try them one at a time, each with the full connect
timeout (a driver's own multi-host connect spends one timeout on the whole list, so a silent first
host would hide the others), and both remember a host that just failed, as Npgsql's host state cache
does: for ``HOST_RECHECK_SECONDS`` it is tried after the others, so that after a failover new
connections go straight to the new primary instead of waiting on the dead one each time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

HOST_RECHECK_SECONDS = 10.0
"""How long a host that failed a connect is tried after the others (Npgsql's default, too)."""

Host = tuple[str, int]


class HostOrder:
    """The hosts in the order to try them now: those believed healthy first, then the ones that
    failed lately. ``shuffle`` (Npgsql's ``Load Balance Hosts``, MySqlConnector's ``Load
    Balance=Random``) shuffles the healthy ones each time."""

    def __init__(self, hosts: Sequence[Host], *, shuffle: bool = False) -> None:
        self.hosts = list(hosts)
        self._shuffle = shuffle
        self._down_until: dict[Host, float] = {}

    def order(self) -> list[Host]:
        now = time.monotonic()
        healthy = [host for host in self.hosts if self._down_until.get(host, 0.0) <= now]
        failed = [host for host in self.hosts if host not in healthy]
        if self._shuffle:
            random.shuffle(healthy)
        return healthy + failed

    def failed(self, host: Host) -> None:
        """``host`` refused, went silent, or is not the kind of server wanted: try it last for a while."""
        self._down_until[host] = time.monotonic() + HOST_RECHECK_SECONDS

    def succeeded(self, host: Host) -> None:
        self._down_until.pop(host, None)
