"""Lightning strategies for DP training, registered in Lightning's StrategyRegistry on import."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dp.strategies.dp import DPStrategy
from lightning_dp.strategies.dp_fsdp import DPFSDPStrategy

StrategyRegistry.register(
    DPStrategy.strategy_name,
    DPStrategy,
    description="Differentially private training on one device (lightning-dp)",
    override=True,
)

StrategyRegistry.register(
    DPFSDPStrategy.strategy_name,
    DPFSDPStrategy,
    description="Differentially private FSDP2 training with per-device clipping (lightning-dp)",
    override=True,
)

__all__ = ["DPFSDPStrategy", "DPStrategy"]
