"""The interface every training data source implements, whatever its storage.

A source yields this rank's micro-batches in order and can save and restore its
position. Resuming on a different number of ranks is the source's job: it receives the
states saved by *every* rank of the interrupted run.
"""

from __future__ import annotations

from typing import Any, Protocol


class DataSource(Protocol):
    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch for this rank (tensors keyed by field name)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, small and picklable."""
        ...

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore from the states of all ranks of the saved run (index = saved rank)."""
        ...


def agreed_position(states: list[dict[str, Any]]) -> int:
    """Global batches consumed, from the states every saved rank wrote.

    Sources whose position is rank-independent (a global batch counter) must find the
    same value on every rank, at a step boundary (checkpoints are only taken there).
    """
    positions = {(s["batches_done"], s["micro_index"]) for s in states}
    if len(positions) != 1:
        raise ValueError(f"ranks saved different data positions: {sorted(positions)}")
    ((batches_done, micro_index),) = positions
    if micro_index:
        raise ValueError(
            "data position saved mid-step; checkpoints are only taken at step boundaries"
        )
    return batches_done
