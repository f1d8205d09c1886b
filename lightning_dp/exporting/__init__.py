"""Release a trained model: a clean ``torch.export`` program plus its privacy card.

(Named ``exporting`` so that ``lightning_dp.export`` stays the function.)
"""

from lightning_dp.exporting.card import make_card, privacy_card, privacy_card_from_checkpoint
from lightning_dp.exporting.program import CARD_FILE, card_path, dp_nodes, export, load

__all__ = [
    "CARD_FILE",
    "card_path",
    "dp_nodes",
    "export",
    "load",
    "make_card",
    "privacy_card",
    "privacy_card_from_checkpoint",
]
