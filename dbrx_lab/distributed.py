"""torch.distributed plumbing for data-parallel jobs (route-stats): one process per model replica.

The ranks come from the launcher's environment (torchrun, `accelerate launch`, srun wrapping torchrun):
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Only small control messages travel between the ranks
(the plan, statuses, progress counters), so the process group is always gloo over TCP, whatever devices
the replicas use; every collective and store wait has the job's timeout (`--dist-timeout`), so a dead or
stuck rank is an error, never a hang. Without a launcher (WORLD_SIZE unset or 1) nothing is initialised.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

__all__ = ["Context", "context", "replica_devices", "RankFailed"]

DEFAULT_TIMEOUT = 1800.0        # seconds: collectives, and waits for other ranks' progress


class RankFailed(ValueError):
    """Another rank failed: this one stopped cleanly (its committed parts are kept)."""


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    group: Any = None
    store: Any = None
    owns_group: bool = False
    prefix: str = ""
    _seen: dict = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # collectives (gloo, with the timeout) ------------------------------------------------------------
    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Collective check: raise on every rank when any rank has an error (the lowest rank's message)."""
        errors = self.gather(None if error is None else _describe(error))
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise RankFailed(f"stopped because rank {rank} failed: {message}")

    # store: counters and the failure flag, without lockstep ---------------------------------------------
    def add(self, key: str, n: int) -> int:
        if self.store is None:
            self._seen[key] = self._seen.get(key, 0) + n
            return self._seen[key]
        return int(self.store.add(self.prefix + key, n))

    def fail(self, message: str) -> None:
        """Tell the other ranks to stop (they check `failed()` between batches); never raises (the store may
        have gone with rank 0)."""
        if self.store is not None:
            try:
                self.store.set(self.prefix + "error", f"rank {self.rank}: {message}")
            except Exception:      # noqa: BLE001
                pass

    def finished(self) -> None:
        """This rank's work is over (done or failed): rank 0 stops waiting for it."""
        try:
            self.add("done", 1)
        except Exception:          # noqa: BLE001 (the store went with rank 0: the final gather reports it)
            pass

    def failed(self) -> str | None:
        if self.store is None or not self.store.check([self.prefix + "error"]):
            return None
        return self.store.get(self.prefix + "error").decode()

    def wait_all_done(self, on_progress=None, poll: float = 0.5) -> None:
        """Wait until every rank added itself to "done" (rank 0, before the final gather), calling
        on_progress() meanwhile; no progress for `timeout` seconds is a TimeoutError."""
        if not self.distributed:
            return
        last, since = None, time.monotonic()
        while True:
            done = self.add("done", 0)
            tokens = self.add("tokens", 0)
            if on_progress is not None:
                on_progress()
            if done >= self.world:
                return
            if (done, tokens) != last:
                last, since = (done, tokens), time.monotonic()
            elif time.monotonic() - since > self.timeout:
                raise TimeoutError(f"{self.world - done} rank(s) made no progress for {self.timeout:.0f} s "
                                   f"(--dist-timeout); committed parts are kept: rerun the command to resume")
            time.sleep(poll)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, (TimeoutError,)):
        from .cli import describe_os_error

        return describe_os_error(err)
    return str(err) or type(err).__name__


def context(timeout: float | None = None) -> Context:
    """The job's ranks from the launcher's environment; a process group is initialised (gloo) when needed."""
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if timeout <= 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout!r}")
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (world <= 1 and not dist.is_initialized()):
        return Context(timeout=timeout)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    group = None
    if dist.get_backend() != "gloo":            # e.g. a caller's NCCL group: control messages go over gloo
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store() if world > 1 else None
    ctx = Context(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)), timeout=timeout,
                  group=group, store=store, owns_group=owns)
    return ctx


def replica_devices(local_rank: int, gpus_per_replica: int) -> list[int]:
    """CUDA device indices of this process's replica: [local_rank * g, (local_rank + 1) * g)."""
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus_per_replica}")
    if gpus_per_replica == 0:
        return []
    count = torch.cuda.device_count()
    first = local_rank * gpus_per_replica
    if first + gpus_per_replica > count:
        raise ValueError(f"local rank {local_rank} with --gpus-per-replica {gpus_per_replica} needs GPUs "
                         f"{first}..{first + gpus_per_replica - 1}, but {count} are visible: start at most "
                         f"{count // gpus_per_replica} processes per node")
    return list(range(first, first + gpus_per_replica))
