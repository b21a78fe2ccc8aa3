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
