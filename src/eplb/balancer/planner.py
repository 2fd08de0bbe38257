"""Migration planner: old placement + new placement -> the expert copies to make, per layer."""

from __future__ import annotations

from typing import NamedTuple

from eplb.balancer.placement import Placement


class Transfer(NamedTuple):
    """Copy ``expert``'s weights from ``src_slot`` (on ``src_rank``, in the OLD placement) into
    ``dst_slot`` (on ``dst_rank``). ``src_rank == dst_rank`` is a local copy."""

    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    expert: int


def plan(old: Placement, new: Placement) -> list[list[Transfer]]:
    """Per layer, one transfer for each slot whose expert changes; none for slots that keep theirs.

    Every source slot holds the expert in ``old`` (all reads are of the old weights, so transfers
    of one layer may run in any order). The source is the destination rank itself when it already
    holds the expert; otherwise the holder that has sent the fewest copies so far in this layer
    (ties: lowest rank), which spreads the sending work.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_ranks != new.num_ranks:
        raise ValueError(
            f"placements differ in shape: old {tuple(old.phy2log.shape)} on {old.num_ranks} ranks, "
            f"new {tuple(new.phy2log.shape)} on {new.num_ranks} ranks"
        )
    if old.num_experts != new.num_experts:
        raise ValueError(f"placements differ in experts: {old.num_experts} vs {new.num_experts}")
    per_rank = old.slots_per_rank
    changed = (old.phy2log != new.phy2log).nonzero().tolist()
    out: list[list[Transfer]] = [[] for _ in range(old.num_layers)]
    if not changed:
        return out
    old_rows = old.phy2log.tolist()
    new_rows = new.phy2log.tolist()
    by_layer: dict[int, list[int]] = {}
    for layer, slot in changed:
        by_layer.setdefault(layer, []).append(slot)
    for layer, slots in by_layer.items():
        holders: dict[int, list[int]] = {}  # expert -> old slots holding it
        for s, e in enumerate(old_rows[layer]):
            holders.setdefault(e, []).append(s)
        sent = [0] * old.num_ranks
        transfers = out[layer]
        for dst in slots:
            expert = new_rows[layer][dst]
            dst_rank = dst // per_rank
            src_slots = holders[expert]  # non-empty: every expert has >= 1 slot in old
            local = [s for s in src_slots if s // per_rank == dst_rank]
            if local:
                src = local[0]
            else:
                src = min(src_slots, key=lambda s: (sent[s // per_rank], s))
                sent[src // per_rank] += 1
            transfers.append(Transfer(src // per_rank, src, dst_rank, dst, expert))
    return out


def apply_plan(old: Placement, transfers: list[list[Transfer]]) -> Placement:
    """The placement that results from running ``transfers`` on ``old`` (reads from old)."""
    phy2log = old.phy2log.clone()
    for layer, layer_transfers in enumerate(transfers):
        for t in layer_transfers:
            if int(old.phy2log[layer, t.src_slot]) != t.expert:
                raise ValueError(
                    f"layer {layer}: source slot {t.src_slot} holds expert "
                    f"{int(old.phy2log[layer, t.src_slot])}, not {t.expert}"
                )
            phy2log[layer, t.dst_slot] = t.expert
    return Placement.from_phy2log(phy2log, old.num_experts, old.num_ranks)


def num_moves(transfers: list[list[Transfer]], cross_rank_only: bool = False) -> int:
    """Copies in a plan (optionally only those between different ranks)."""
    return sum(
        1 for layer in transfers for t in layer if not cross_rank_only or t.src_rank != t.dst_rank
    )
