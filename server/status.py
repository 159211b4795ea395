"""What a supervisor and its workers share: each worker's state, in memory they all map."""

from __future__ import annotations

from typing import Any


class WorkerStatus:
    """What every worker may read of the others: each one's metrics port, 0 while it is down."""

    def __init__(self, ports: Any) -> None:  # a multiprocessing Array of ints, one per worker
        self._ports = ports

    def ready(self, index: int, metrics_port: int) -> None:
        self._ports[index] = metrics_port

    def down(self, index: int) -> None:
        self._ports[index] = 0

    def ports(self) -> list[int]:
        return list(self._ports)

    def all_up(self) -> bool:
        return all(port > 0 for port in self._ports)
