"""One persistent gRPC channel per live worker, and the requests in flight on each.

Channels are opened when a worker joins and closed when it leaves (membership watch), so the
request path never dials. Predicts travel as frames on one stream per channel
(router.worker_stream), half-closed when the worker leaves so that what is in flight finishes.
In-flight counts drive the spill decision in `choose_order`; the outlier ejector
(router.ejection) keeps each worker's recent failures and is told when a worker leaves, so its
state never outlives the worker.
"""
from __future__ import annotations

import grpc

from modelfleet import tls
from modelfleet.rpc import CHANNEL_OPTIONS
from modelfleet.v1 import worker_pb2_grpc
from router.ejection import OutlierEjector
from router.worker_stream import WorkerPredict
from version_service.schema import WorkerRecord

# gRPC shares one connection (subchannel) among channels to one address with the same arguments:
# the fresh channel for a worker restarted at its old address inherited the dead process's
# reconnect backoff and failed at once (then the worker was ejected). An argument naming the
# process gives each process its own. (A channel-local subchannel pool does too, but the router's
# CPU per forwarded request was ~10 % higher with it in a short, noisy A/B: two runs each.)
_PROCESS_ARG = "modelfleet.worker_process"


class WorkerPool:
    def __init__(self, ejector: OutlierEjector | None = None,
                 credentials: grpc.ChannelCredentials | None = None, transport: str = "stream") -> None:
        """credentials: TLS (or mutual TLS) to the workers; None = plaintext. transport: how
        Predicts travel, "stream" or "unary" (router.worker_stream)."""
        self.stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self.predictors: dict[str, WorkerPredict] = {}
        self._transport = transport
        self.inflight: dict[str, int] = {}
        self.ejector = ejector if ejector is not None else OutlierEjector()
        self._credentials = credentials
        self._channels: dict[str, tuple[WorkerRecord, grpc.aio.Channel]] = {}

    def update(self, workers: dict[str, WorkerRecord]) -> list[grpc.aio.Channel]:
        """Opens channels to new workers; returns the channels of departed ones (caller closes)."""
        stale: list[grpc.aio.Channel] = []
        for worker_id, (known, channel) in list(self._channels.items()):
            record = workers.get(worker_id)
            # A new process under this id, at a new address or at the same one (a restarted
            # container keeps its pod's IP): a fresh channel, which connects at once instead of
            # after the old one's reconnect backoff, and no ejection carried over from the old one.
            if record is None or (record.address, record.started) != (known.address, known.started):
                del self._channels[worker_id]
                self.stubs.pop(worker_id, None)
                self.predictors.pop(worker_id).close()
                self.ejector.forget(worker_id)
                stale.append(channel)
            elif record != known:  # the same process, e.g. gone live after its warm-up
                self._channels[worker_id] = (record, channel)
        for worker_id, record in workers.items():
            if worker_id not in self._channels:
                channel = tls.channel(record.address, self._credentials,
                                      options=[*CHANNEL_OPTIONS, (_PROCESS_ARG, f"{worker_id} {record.started}")])
                self._channels[worker_id] = (record, channel)
                stub = self.stubs[worker_id] = worker_pb2_grpc.WorkerStub(channel)
                self.predictors[worker_id] = WorkerPredict(stub, self._transport)
                self.inflight.setdefault(worker_id, 0)
        for worker_id in list(self.inflight):
            if worker_id not in workers and self.inflight[worker_id] == 0:
                del self.inflight[worker_id]
        return stale

    def choose_order(self, shard: tuple[str, ...], spill_inflight: int) -> list[str]:
        """The order to try the shard's members in.

        Affinity: the first member takes a tenant's traffic, so its model stays hot on one worker.
        Spill: when the first member already has `spill_inflight` requests in flight, the least
        loaded other member goes first. The rest follow as failover targets.
        """
        if len(shard) < 2 or self.inflight.get(shard[0], 0) < spill_inflight:
            return list(shard)
        rest = sorted(shard[1:], key=lambda w: self.inflight.get(w, 0))
        if self.inflight.get(rest[0], 0) >= self.inflight.get(shard[0], 0):
            return list(shard)
        return [rest[0], shard[0], *rest[1:]]

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self.stubs.clear()
        self.predictors.clear()
