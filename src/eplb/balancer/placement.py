"""Expert placement: which logical expert each physical slot holds, in three consistent views.

For ``L`` layers, ``E`` logical experts, ``G`` ranks and ``P = E + R`` physical slots, rank ``g``
holds slots ``[g*P/G, (g+1)*P/G)``.

- ``phy2log  [L, P]``: logical expert of each slot (the source of truth),
- ``log2phy  [L, E, M]``: slots of each expert in ascending order, padded with -1 (M = max replicas),
- ``replica_count [L, E]``: number of slots of each expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def build_log2phy(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phy2log [L, P]`` -> ``(log2phy [L, E, M], replica_count [L, E])``, slots ascending."""
    num_layers, num_physical = phy2log.shape
    counts = torch.zeros(num_layers, num_experts, dtype=torch.long)
    counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    max_rep = max(int(counts.max()) if counts.numel() else 1, 1)
    # Sorting by (expert, slot) groups each expert's slots in ascending slot order.
    order = torch.argsort(phy2log * num_physical + torch.arange(num_physical), dim=1)
    sorted_exp = phy2log.gather(1, order)
    starts = torch.cumsum(counts, dim=1) - counts  # [L, E] first position of each expert
    rank_in = torch.arange(num_physical).expand(num_layers, -1) - starts.gather(1, sorted_exp)
    log2phy = torch.full((num_layers, num_experts * max_rep), -1, dtype=torch.long)
    log2phy.scatter_(1, sorted_exp * max_rep + rank_in, order)
    return log2phy.view(num_layers, num_experts, max_rep), counts


@dataclass
class Placement:
    """A placement of ``E`` experts on ``G`` ranks for ``L`` layers (see the module docstring)."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    replica_count: torch.Tensor
    num_ranks: int

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_experts: int, num_ranks: int) -> "Placement":
        """Build the other two views from ``phy2log [L, P]`` and validate."""
        phy2log = torch.as_tensor(phy2log)
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be 2-D [layers, slots], got shape {tuple(phy2log.shape)}")
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise ValueError(f"phy2log must be an integer tensor, got {phy2log.dtype}")
        phy2log = phy2log.to(torch.long).contiguous()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
            raise ValueError(
                f"phy2log values must be expert ids in [0, {num_experts}), got range "
                f"[{int(phy2log.min())}, {int(phy2log.max())}]"
            )
        log2phy, counts = build_log2phy(phy2log, num_experts)
        placement = cls(phy2log, log2phy, counts, num_ranks)
        placement.validate()
        return placement

    @classmethod
    def default(
        cls, num_layers: int, num_experts: int, num_ranks: int, num_redundant: int = 0
    ) -> "Placement":
        """Linear placement: slot s < E holds expert s; redundant slot E+j holds expert j % E."""
        check_shape(num_layers, num_experts, num_ranks, num_redundant)
        num_physical = num_experts + num_redundant
        row = torch.arange(num_physical) % num_experts
        return cls.from_phy2log(row.expand(num_layers, -1).clone(), num_experts, num_ranks)

    # ----- views --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.replica_count.shape[1])

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_experts

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def rank_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_physical:
            raise ValueError(f"slot must be in [0, {self.num_physical}), got {slot}")
        return slot // self.slots_per_rank

    def rank_experts(self) -> torch.Tensor:
        """``[L, G, P/G]``: the experts of each rank's slots."""
        return self.phy2log.view(self.num_layers, self.num_ranks, self.slots_per_rank)

    def num_colocated(self) -> torch.Tensor:
        """``[L]``: slots that hold an expert already held by an earlier slot of the same rank."""
        r = torch.sort(self.rank_experts(), dim=-1).values
        return (r[..., 1:] == r[..., :-1]).sum(dim=(-1, -2))

    # ----- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first broken invariant."""
        if not isinstance(self.num_ranks, int) or self.num_ranks < 1:
            raise ValueError(f"num_ranks must be an integer >= 1, got {self.num_ranks!r}")
        if self.phy2log.dim() != 2:
            raise ValueError(f"phy2log must be [layers, slots], got shape {tuple(self.phy2log.shape)}")
        num_layers, num_physical = self.phy2log.shape
        if self.replica_count.dim() != 2 or self.replica_count.shape[0] != num_layers:
            raise ValueError(
                f"replica_count must be [layers={num_layers}, experts], got {tuple(self.replica_count.shape)}"
            )
        num_experts = self.replica_count.shape[1]
        if num_physical < num_experts:
            raise ValueError(f"slots ({num_physical}) must be >= experts ({num_experts})")
        if num_physical % self.num_ranks:
            raise ValueError(
                f"num_ranks ({self.num_ranks}) must divide the number of slots ({num_physical})"
            )
        if self.log2phy.dim() != 3 or tuple(self.log2phy.shape[:2]) != (num_layers, num_experts):
            raise ValueError(
                f"log2phy must be [layers={num_layers}, experts={num_experts}, max_replicas], "
                f"got {tuple(self.log2phy.shape)}"
            )
        if num_physical and (int(self.phy2log.min()) < 0 or int(self.phy2log.max()) >= num_experts):
            raise ValueError(f"phy2log values must be expert ids in [0, {num_experts})")
        log2phy, counts = build_log2phy(self.phy2log, num_experts)
        if not torch.equal(counts, self.replica_count):
            raise ValueError("replica_count does not match phy2log")
        if int(counts.min()) < 1:
            layer, expert = (counts < 1).nonzero()[0].tolist()
            raise ValueError(f"expert {expert} of layer {layer} has no slot (every expert needs >= 1)")
        m = self.log2phy.shape[2]
        if m < log2phy.shape[2] or not torch.equal(self.log2phy[..., : log2phy.shape[2]], log2phy) or (
            m > log2phy.shape[2] and bool((self.log2phy[..., log2phy.shape[2]:] != -1).any())
        ):
            raise ValueError("log2phy does not match phy2log (slots ascending, -1 padded)")

    # ----- comparison and persistence -----------------------------------------------------
    def moved_slots(self, previous: "Placement") -> torch.Tensor:
        """``[L]``: slots whose expert differs from ``previous`` (same shape required)."""
        if previous.phy2log.shape != self.phy2log.shape:
            raise ValueError(
                f"previous placement shape {tuple(previous.phy2log.shape)} differs from "
                f"{tuple(self.phy2log.shape)}"
            )
        return (previous.phy2log != self.phy2log).sum(dim=1)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_ranks": self.num_ranks,
            "num_experts": self.num_experts,
            "phy2log": self.phy2log.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Placement":
        if not isinstance(data, dict):
            raise ValueError(f"placement JSON must be an object, got {type(data).__name__}")
        for key in ("num_ranks", "num_experts", "phy2log"):
            if key not in data:
                raise ValueError(f"placement JSON lacks the key {key!r}")
        try:
            phy2log = torch.tensor(data["phy2log"], dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"placement JSON phy2log must be a list of integer lists: {exc}") from None
        return cls.from_phy2log(phy2log, data["num_experts"], data["num_ranks"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_json(data)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Placement)
            and self.num_ranks == other.num_ranks
            and self.phy2log.shape == other.phy2log.shape
            and self.num_experts == other.num_experts
            and torch.equal(self.phy2log, other.phy2log)
        )


def check_shape(num_layers: int, num_experts: int, num_ranks: int, num_redundant: int) -> None:
    """ValueError naming the field when the sizes cannot form a placement."""
    for name, value, low in (
        ("num_layers", num_layers, 1),
        ("num_experts", num_experts, 1),
        ("num_ranks", num_ranks, 1),
        ("num_redundant", num_redundant, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if (num_experts + num_redundant) % num_ranks:
        raise ValueError(
            f"num_ranks ({num_ranks}) must divide experts + redundant "
            f"({num_experts} + {num_redundant} = {num_experts + num_redundant})"
        )
