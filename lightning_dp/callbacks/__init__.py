"""Lightning callbacks of lightning-dp."""

from lightning_dp.callbacks.privacy_accountant import PrivacyAccountant

__all__ = ["PrivacyAccountant"]
