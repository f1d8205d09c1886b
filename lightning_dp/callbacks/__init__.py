"""Lightning callbacks of lightning-dp."""

from lightning_dp.callbacks.privacy_accountant import PrivacyAccountant
from lightning_dp.callbacks.privacy_report import PrivacyReport

__all__ = ["PrivacyAccountant", "PrivacyReport"]
