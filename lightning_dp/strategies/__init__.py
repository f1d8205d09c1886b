"""Lightning strategies for DP training, registered in Lightning's StrategyRegistry on import."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dp.strategies.dp import DPStrategy

StrategyRegistry.register(
    DPStrategy.strategy_name,
    DPStrategy,
    description="Differentially private training on one device (lightning-dp)",
    override=True,
)

__all__ = ["DPStrategy"]
