"""The inductor custom pass that carries lightning-dp's rewrites of the compiled backward."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lightning_dp.passes.join_group_scales import join_group_scales
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from lightning_dp.engine import deferred_ops

#: The code whose behaviour the compiled graph depends on: this package and the ops it rewrites.
_SOURCE_FILES = sorted(Path(__file__).parent.glob("*.py")) + [Path(deferred_ops.__file__)]


class DPGraphPass(CustomGraphPass):
    """Runs on every post-grad graph; inert where no DP op occurs (forward and inference graphs).

    ``uuid()`` hashes the pass code and every DP setting that shapes the graph, so inductor's
    FX-graph cache can never serve a graph compiled without the pass or for other settings.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __call__(self, graph: fx.Graph) -> None:
        join_group_scales(graph)

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for path in _SOURCE_FILES:
            digest.update(path.read_bytes())
        digest.update(json.dumps(self.settings, sort_keys=True, default=str).encode())
        return digest.hexdigest()
