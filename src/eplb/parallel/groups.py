"""torch.distributed set-up for the DP+EP runtime.

One process per DP rank; all ranks together are the EP group (DP size == EP size), which is
the default (WORLD) group. Expert-weight transfers of EPLB run on a SEPARATE group so that the
async worker thread never interleaves its point-to-point traffic with the main loop's
per-step collectives (gloo and NCCL both need one issuing thread per group).

Rendezvous: ``tcp://address:port`` in the style of vLLM's ``--data-parallel-address`` /
``--data-parallel-rpc-port``, or from torchrun's environment (``resolve_rendezvous``).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from eplb.config import ParallelConfig

# Long enough for a slow first step (model load skew between ranks); the EPLB transfer
# group gets its own, much shorter timeout (EPLBConfig.transfer_timeout_s).
DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class DistContext:
    """What a rank needs to talk to the others.

    ``ep_group`` is the group of the MoE collectives and the per-step agreement;
    ``transfer_group`` carries expert weights (sync and async EPLB).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    ep_group: dist.ProcessGroup | None
    transfer_group: dist.ProcessGroup | None
    transfer_timeout_s: float

    @property
    def comm_device(self) -> torch.device:
        """Device of tensors handed to collectives (CPU for gloo, the GPU for NCCL)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def renew_transfer_group(self, abort_old: bool = False) -> None:
        """Replace the transfer group by a fresh one (a collective: every rank calls it); with
        ``abort_old``, the old one is aborted first (see retire_transfer_group)."""
        if abort_old:
            retire_transfer_group(self, self.transfer_group)
        self.transfer_group = new_transfer_group(self)


def find_free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Rendezvous:
    """Where this node's ranks meet the others: ``tcp://address:port``; this node holds ranks
    ``start_rank .. start_rank + local_size``."""

    address: str
    port: int  # 0 = pick a free local port at start (single node only)
    node_rank: int
    local_size: int
    start_rank: int = 0


def resolve_rendezvous(parallel: ParallelConfig, env: dict[str, str] | None = None) -> Rendezvous:
    """Explicit ``ParallelConfig`` values win. Otherwise, under torchrun (one front process per
    node: ``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK``/``NODE_RANK``, ``WORLD_SIZE`` = number
    of fronts) the ranks meet at ``MASTER_ADDR:MASTER_PORT+1`` (torchrun's own store holds
    ``MASTER_PORT``), this node is ``GROUP_RANK`` and holds ``data_parallel_size / WORLD_SIZE``
    ranks. Otherwise everything is local."""
    env = dict(os.environ) if env is None else env
    size = parallel.data_parallel_size
    torchrun = "MASTER_ADDR" in env and "MASTER_PORT" in env
    fronts = int(env.get("WORLD_SIZE", "1")) if torchrun else 1
    local = parallel.data_parallel_size_local or (size // fronts if size % fronts == 0 else 0)
    if local < 1 or local > size or size % local:
        raise ValueError(
            f"data_parallel_size_local ({parallel.data_parallel_size_local or local}) must divide "
            f"data_parallel_size ({size})")
    def start(node: int) -> int:
        first = parallel.data_parallel_start_rank
        first = node * local if first is None else first
        if first + local > size:
            raise ValueError(f"data_parallel_start_rank ({first}) + data_parallel_size_local "
                             f"({local}) must not exceed data_parallel_size ({size})")
        return first

    if parallel.data_parallel_rpc_port:
        return Rendezvous(parallel.data_parallel_address, parallel.data_parallel_rpc_port,
                          parallel.node_rank, local, start(parallel.node_rank))
    if torchrun:
        node = parallel.node_rank or int(env.get("GROUP_RANK", env.get("NODE_RANK", "0")))
        return Rendezvous(env["MASTER_ADDR"], int(env["MASTER_PORT"]) + 1, node, local,
                          start(node))
    if local < size:
        raise ValueError("data_parallel_rpc_port must be set when ranks span several nodes "
                         "(data_parallel_size_local < data_parallel_size)")
    return Rendezvous(parallel.data_parallel_address, 0, parallel.node_rank, local,
                      start(parallel.node_rank))


def backend_for(device: str | torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def set_nccl_env() -> None:
    """NVLink SHARP (multicast) off in every process: it hangs or fails on the lent machines."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"


def init_distributed(
    rank: int,
    world_size: int,
    *,
    address: str,
    port: int,
    device: str | torch.device = "cpu",
    local_rank: int | None = None,
    transfer_timeout_s: float = 60.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistContext:
    """Join the job and build the EP group and the transfer group.

    Every rank of the job must call this with the same ``world_size``, address and port.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    dev = torch.device(device)
    backend = backend_for(dev)
    local_rank = rank if local_rank is None else local_rank
    if backend == "nccl":
        set_nccl_env()
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": dev} if backend == "nccl" else {}),
        )
    ctx = DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=dev,
        ep_group=dist.group.WORLD,
        transfer_group=None,
        transfer_timeout_s=transfer_timeout_s,
    )
    ctx.renew_transfer_group()
    return ctx


def new_transfer_group(ctx: DistContext) -> dist.ProcessGroup:
    """A fresh group for expert-weight traffic; a collective over the EP group (all ranks call).

    Made anew after a failed transfer: a group whose point-to-point ops timed out may still
    hold unmatched messages that would pair with the next rebalance's.
    """
    group = dist.new_group(
        ranks=list(range(ctx.world_size)),
        timeout=datetime.timedelta(seconds=ctx.transfer_timeout_s),
        backend=ctx.backend,
    )
    # NCCL needs every rank in a group's first op; a barrier-like all-reduce does it for both.
    warm = torch.zeros(1, device=ctx.comm_device)
    dist.all_reduce(warm, group=group)
    # NCCL connects each pair for point-to-point lazily, at its first send/recv: about 0.25 s on
    # two H200s, which would land in the middle of the first rebalance (and of a serving step).
    # One tiny exchange with every peer pays it here, at start-up.
    if ctx.world_size > 1:
        send = torch.zeros(ctx.world_size, device=ctx.comm_device)
        recv = torch.empty_like(send)
        ops = []
        for peer in range(ctx.world_size):
            if peer != ctx.rank:
                ops.append(dist.P2POp(dist.isend, send[peer:peer + 1], peer, group))
                ops.append(dist.P2POp(dist.irecv, recv[peer:peer + 1], peer, group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return group


def retire_transfer_group(ctx: DistContext, group: dist.ProcessGroup | None) -> None:
    """Stop a transfer group that may hold posted ops a peer will never match (a rank failed
    before posting its side). NCCL: abort its communicator so those kernels stop spinning on the
    GPU. gloo: nothing to do (its pending ops fail at the group's timeout)."""
    if group is None or ctx.backend != "nccl":
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group(group)
    except Exception as exc:  # noqa: BLE001 - best effort: the group is never used again
        import logging

        logging.getLogger("eplb.parallel").warning("could not abort the old transfer group: %s",
                                                   exc)


def destroy() -> None:
    """Leave the job (best effort; a rank whose peers are gone must still exit)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - peers may already be gone at shutdown
            pass
