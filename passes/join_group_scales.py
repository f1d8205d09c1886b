"""Join each clipping group's ``group_scale`` nodes into one ``clip_scale`` after all its norms.

In the compiled backward every DP primitive emits ``group_scale(norm_sq, clipper, group, site,
params)``
and uses the result to scale its output-gradient rows before the weight-gradient matmul. This
pass replaces the nodes of one group by a single ``clip_scale([norm_sq, ...], clipper, group)``
placed after the last member's norm, then re-sorts the graph so that every weight-gradient
computation of the group runs after it: flat and group clipping in one backward pass
(book-keeping), per-layer clipping fused with its own layer's backward.

A tied parameter's uses emit ``shared_scale(norm_sq, factors, clipper, group, site, param)``
instead: its per-example norm is that of the sum over its uses, so the pass adds one
``shared_norm_sq(norm_sqs, factors, counts)`` per parameter, after its last use, to the group's
norms.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import torch
from torch import fx

from lightning_dp.engine.deferred_ops import clipper_by_id  # also registers the ops

GROUP_SCALE = torch.ops.lightning_dp.group_scale.default
SHARED_SCALE = torch.ops.lightning_dp.shared_scale.default
SHARED_NORM_SQ = torch.ops.lightning_dp.shared_norm_sq.default
CLIP_SCALE = torch.ops.lightning_dp.clip_scale.default

#: Rewrites done in this process (tests assert on it).
counters: dict[str, int] = defaultdict(int)


def join_group_scales(graph: fx.Graph) -> int:
    """Replace every group's ``group_scale`` nodes by one ``clip_scale``; return groups joined."""
    members: dict[tuple[int, str], list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.target in (GROUP_SCALE, SHARED_SCALE):
            clipper, group, _, _ = _call(node)
            members[(clipper, group)].append(node)
    if not members:
        return 0
    position = {node: i for i, node in enumerate(graph.nodes)}
    for (clipper, group), nodes in members.items():
        own = [node for node in nodes if node.target is GROUP_SCALE]
        _check_one_use_per_parameter(group, own)
        _check_whole_group(clipper, group, nodes)
        norms = [node.args[0] for node in own] + _shared_norms(graph, nodes, position)
        last = max(norms, key=position.__getitem__)
        with graph.inserting_after(last):
            joined = graph.call_function(CLIP_SCALE, (norms, clipper, group))
        joined.meta["val"] = nodes[0].meta.get("val")
        for node in nodes:
            node.replace_all_uses_with(joined)
            graph.erase_node(node)
    stable_topological_sort(graph)
    graph.lint()
    counters["groups_joined"] += len(members)
    return len(members)


def _call(node: fx.Node) -> tuple[int, str, int, str]:
    """(clipper, group, site, params): the last four arguments of both scale ops."""
    return node.args[-4:]


def _shared_norms(graph: fx.Graph, nodes: list[fx.Node], position: dict[fx.Node, int]) -> list[fx.Node]:
    """One ``shared_norm_sq`` node per shared parameter of the group, over all its uses."""
    uses: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        if node.target is SHARED_SCALE:
            uses[_call(node)[3]].append(node)
    norms = []
    for scales in uses.values():
        norm_sqs = [node.args[0] for node in scales]
        factors = [factor for node in scales for factor in node.args[1]]
        counts = [len(node.args[1]) for node in scales]
        last = max(norm_sqs + factors, key=position.__getitem__)
        with graph.inserting_after(last):
            norm = graph.call_function(SHARED_NORM_SQ, (norm_sqs, factors, counts))
        norm.meta["val"] = SHARED_NORM_SQ(
            [n.meta["val"] for n in norm_sqs], [f.meta["val"] for f in factors], counts
        )
        position[norm] = position[last] + 0.5  # after its last input, for the choice of `last` below
        norms.append(norm)
        counters["shared_parameters"] += 1
    return norms


def _check_one_use_per_parameter(group: str, nodes: list[fx.Node]) -> None:
    """Calls with disjoint parameters (a module's own forward scaling by one parameter and
    shifting by another) add their squared norms; two calls of one parameter need the cross
    term of their per-example gradients, so they must come as ``shared_scale`` nodes."""
    seen: set[str] = set()
    for node in nodes:
        params = set(_call(node)[3].split(","))
        repeated = sorted(params & seen)
        if repeated:
            raise RuntimeError(
                f"lightning-dp: parameters {repeated} of clipping group {group!r} are used more "
                "than once per forward in a compiled model (a module called twice) that no eager "
                "step showed before compiling; their per-example gradient is the sum over the "
                "uses. Run one eager training step before lightning_dp.compile (DPStrategy("
                "compile=True) does), so that the compiled graph sums them."
            )
        seen |= params


def _check_whole_group(clipper: int, group: str, nodes: list[fx.Node]) -> None:
    """Every module of the group must be in this graph: a group split across graphs (a graph
    break, or modules compiled separately) would be clipped piecewise, breaking its bound."""
    expected = clipper_by_id(clipper).group_sites[group]
    present = {_call(node)[2] for node in nodes}
    if present != expected:
        raise RuntimeError(
            f"lightning-dp: clipping group {group!r} has {len(present)} of its {len(expected)} "
            "modules in this compiled graph; the rest run in another graph (a graph break, or "
            "modules compiled separately), where the group's norm cannot be completed. Compile "
            "with fullgraph=True to find the break, or use groups inside one compiled module."
        )


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the given order where possible."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in nodes}
    ready = [node for node in nodes if waiting[node] == 0 and node.op != "output"]
    order: list[fx.Node] = []
    heap = [(position[node], node.name) for node in ready]
    by_name = {node.name: node for node in nodes}
    heapq.heapify(heap)
    output = next(node for node in nodes if node.op == "output")
    while heap:
        _, name = heapq.heappop(heap)
        node = by_name[name]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0 and user is not output:
                heapq.heappush(heap, (position[user], user.name))
    if len(order) != len(nodes) - 1:
        raise RuntimeError("lightning-dp: the graph has a cycle after joining clipping groups")
    cursor = order[0]
    for node in order[1:]:
        cursor.append(node)
        cursor = node
    cursor.append(output)
