"""Pieces shared by every model family: weight init that is independent of sharding,
and the generic parallelize step (FSDP2 per block, activation checkpointing, compile)."""
