"""``grpc.health.v1.Health`` with every method the protocol declares.

grpcio-health-checking's asyncio servicer leaves ``List`` to its generated base
class, which raises NotImplementedError: a balancer or ``grpc-health-probe``
calling it got UNKNOWN and the server logged a traceback. This one answers it.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in grpc-stubs


class HealthServicer(health_aio.HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status now (a snapshot; Watch follows changes)."""
        # The base class keeps the statuses in _server_status (set, enter_graceful_shutdown write it).
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in statuses.items()}
        )
