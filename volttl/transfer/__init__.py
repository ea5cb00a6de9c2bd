"""Transfer strategies (FTL, TF, LWFT, TTL) over any backbone's declared cut points."""

from volttl.transfer.strategies import (
    STRATEGIES,
    TransferSetup,
    apply_strategy,
    build_transfer_model,
)

__all__ = ["STRATEGIES", "TransferSetup", "apply_strategy", "build_transfer_model"]
