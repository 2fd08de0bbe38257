"""Typed messages between the front (``dp_client``) and the rank processes (``dp_worker``).

They cross process boundaries through multiprocessing queues (pickled), so they are plain
frozen dataclasses of picklable fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


# ----- front -> rank ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    # an output every N new tokens (and the first and the final: output_stream.DeltaEncoder);
    # None: the final one only
    stream_interval: int | None = 1


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


class OutputDelta(NamedTuple):
    """What one step added to a request's output (``eplb.runtime.output_stream``): the front
    rebuilds the cumulative ``RequestOutput`` from these. A NamedTuple, not a frozen dataclass
    like the other messages: one is made and pickled per request per step, and a frozen
    dataclass's construction and pickling cost about 3x as much."""

    request_id: str
    new_token_ids: list[int]
    text_keep: int  # characters of the text sent so far that still stand (a stop string or the
    text_add: str  # final decode may rewrite the tail), then what follows them
    finished: bool
    finish_reason: str | None
    new_logprobs: list | None  # [TokenLogprob] of the new tokens; None when not requested
    prompt_logprobs: list | None = None  # sent once, with the first delta that has them


@dataclass(frozen=True)
class RankOutputs:
    rank: int
    outputs: list  # [OutputDelta]


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
