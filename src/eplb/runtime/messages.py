"""Typed messages between the front (``dp_client``) and the rank processes (``dp_worker``).

They cross process boundaries through multiprocessing queues (pickled), so they are plain
frozen dataclasses of picklable fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# ----- front -> rank ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class StatsQuery:
    token: int


@dataclass(frozen=True)
class Wake:
    """Unblocks an idle rank: another rank of this node just got work."""


@dataclass(frozen=True)
class Shutdown:
    pass


# ----- rank -> front ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RankReady:
    rank: int
    info: dict


@dataclass(frozen=True)
class RankOutputs:
    rank: int
    outputs: list  # [RequestOutput]


@dataclass(frozen=True)
class RequestRejected:
    rank: int
    request_id: str
    message: str


@dataclass(frozen=True)
class StatsReply:
    rank: int
    token: int
    stats: dict


@dataclass(frozen=True)
class RankError:
    rank: int
    text: str


@dataclass(frozen=True)
class RankExit:
    """The rank left its loop. ``stopped_here``: its own front asked; False when another
    node's front stopped the job."""

    rank: int
    stopped_here: bool = True
