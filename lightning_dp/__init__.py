"""Differentially private training for PyTorch Lightning."""

__all__: list[str] = []
