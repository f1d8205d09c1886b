"""Every compile test starts from a clean dynamo, without on-disk caches, so the pass really runs."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No dynamo state and no on-disk compile caches carried in, so the pass really runs here."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
