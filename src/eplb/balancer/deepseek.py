"""DeepSeek's published EPLB algorithm (github.com/deepseek-ai/EPLB, ``eplb.py``), re-implemented.

Same inputs give the same ``phy2log`` as their ``rebalance_experts``: we follow their steps and
their tie-breaks (a float32 descending sort, the first lightest pack, the first heaviest
replica), but run the packing loop over all layers at once instead of one layer at a time.

- replicate: give each of the ``R`` extra slots to the expert with the highest load per replica;
- pack: heaviest item first into the lightest pack that still has room (``n/m`` items per pack);
- hierarchical (``num_groups % num_nodes == 0``): pack expert groups onto nodes, replicate inside
  each node, pack each node's replicas onto its ranks; otherwise the same with one node, one group.
"""

from __future__ import annotations

import torch


def greedy_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [X, n]`` -> ``(pack [X, n], position in pack [X, n])``, ``n / num_packs`` per pack."""
    rows_n, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:  # as in the original: one item per pack keeps the identity order
        return (torch.arange(n).expand(rows_n, n).clone(), torch.zeros(rows_n, n, dtype=torch.long))
    order = weight.float().sort(-1, descending=True).indices
    weight = weight.float()
    rows = torch.arange(rows_n)
    pack_load = torch.zeros(rows_n, num_packs, dtype=torch.float32)
    pack_fill = torch.zeros(rows_n, num_packs, dtype=torch.long)
    pack = torch.empty(rows_n, n, dtype=torch.long)
    position = torch.empty(rows_n, n, dtype=torch.long)
    inf = torch.tensor(float("inf"))
    for j in range(n):
        item = order[:, j]
        target = torch.where(pack_fill < per_pack, pack_load, inf).argmin(-1)
        pack[rows, item] = target
        position[rows, item] = pack_fill[rows, target]
        pack_load[rows, target] += weight[rows, item]
        pack_fill[rows, target] += 1
    return pack, position


def greedy_replicate(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [X, n]`` -> ``(slot -> item [X, num_physical], count [X, n])``: slot i < n holds
    item i, each extra slot the item with the highest load per replica at that moment."""
    rows_n, n = weight.shape
    rows = torch.arange(rows_n)
    slot_item = torch.arange(num_physical).repeat(rows_n, 1)
    count = torch.ones(rows_n, n, dtype=torch.long)
    for slot in range(n, num_physical):
        hot = (weight / count).max(dim=-1).indices
        slot_item[:, slot] = hot
        count[rows, hot] += 1
    return slot_item, count


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())
    return inv


def deepseek_phy2log(
    load: torch.Tensor, num_ranks: int, num_redundant: int, num_nodes: int = 1, num_groups: int = 1
) -> torch.Tensor:
    """``load [L, E]`` -> ``phy2log [L, E + R]`` exactly as DeepSeek's ``rebalance_experts``."""
    weight = load.float().cpu()
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    num_layers, num_experts = weight.shape
    num_physical = num_experts + num_redundant
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_rank = num_physical // num_ranks
    experts_per_node = num_experts // num_nodes

    # 1. expert groups -> nodes; renumber experts so that node n owns a contiguous id range.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_node, group_pos = greedy_pack(group_load, num_nodes)
    first = (group_node * groups_per_node + group_pos) * group_size  # [L, K]
    log2node_id = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)  # [L, E]
    node_id2log = _inverse(log2node_id)

    # 2. replicate inside each node: rows are (layer, node).
    node_weight = weight.gather(-1, node_id2log).view(-1, experts_per_node)
    slot2node_id, node_count = greedy_replicate(node_weight, num_physical // num_nodes)

    # 3. pack each node's replicas onto its ranks.
    replica_load = (node_weight / node_count).gather(-1, slot2node_id)
    rank, pos = greedy_pack(replica_load, num_ranks // num_nodes)
    placed = _inverse(rank * slots_per_rank + pos)  # final slot (inside node) -> replica
    final_node_id = slot2node_id.gather(-1, placed).view(num_layers, num_nodes, -1)
    final_node_id = final_node_id + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)
    return node_id2log.gather(-1, final_node_id.flatten(-2))
