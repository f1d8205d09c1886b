"""Compile-time graph passes for lightning-dp, installed as ``lightning_dp.passes``.

``DPGraphPass`` is what ``lightning_dp.compile`` installs as inductor's
``post_grad_custom_pre_pass``; ``join_group_scales`` is its one rewrite.
"""

from lightning_dp.passes.dp_graph_pass import DPGraphPass
from lightning_dp.passes.join_group_scales import join_group_scales, stable_topological_sort

__all__ = ["DPGraphPass", "join_group_scales", "stable_topological_sort"]
