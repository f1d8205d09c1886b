"""Compile-time graph passes for lightning-dp, installed as ``lightning_dp.passes``."""

__all__: list[str] = []
