"""Lightning callbacks of lightning-dfa: the optical cost ledger."""

from lightning_dfa.callbacks.optical_ledger import OpticalLedger, find_engine

__all__ = ["OpticalLedger", "find_engine"]
