"""Sharded checkpoints with torch.distributed.checkpoint (DCP) on any fsspec location.

Layout under the checkpoint root (a local path or an fsspec URL such as ``s3://b/run``)::

    latest                  text file naming the newest *complete* step directory
    step_00001000/
        .metadata, *.distcp model, optimizers, EMA (DCP: resharded on load)
        rank_00000.pt ...   per-rank state: RNG, data position, objective state
        trainer.pt          rank-independent state: counters, LR schedulers, world size
        meta.json           written last; its presence marks the checkpoint complete

The sharded part (model, optimizers, EMA) is written by a ``shards`` writer: DCP by
default; the DeepSpeed backend puts DeepSpeed's own files there instead
(trainer.backends.deepspeed_backend). ``meta.json`` records which (``format``).

Crash safety: ``meta.json`` is written only after every rank's files and DCP's own
``.metadata`` exist, and ``latest`` is replaced (atomically: rename locally, one PUT on
object stores) only after ``meta.json``. A crash at any moment leaves ``latest`` naming
the previous complete checkpoint; incomplete directories are removed at the next start.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    return not isinstance(fs, fsspec.implementations.local.LocalFileSystem)


@dataclass
class LoadedCheckpoint:
    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None  # this rank's saved state, None when the rank is new
    all_rank_states: list[dict[str, Any]] = field(default_factory=list)
    saved_world_size: int = 1


class CheckpointStore:
    """Where checkpoints live and which of them are complete; no torch.distributed needed."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.remote = _is_remote(self.fs)

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def url(self, *parts: str) -> str:
        """A URL DCP's fsspec reader/writer understands (plain path when local)."""
        if not self.remote:
            return self.join(*parts)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://" + self.join(*parts)

    def refresh(self) -> None:
        """Forget cached listings: other processes (ranks) write here too."""
        if self.remote:
            self.fs.invalidate_cache()

    def step_dirs(self) -> list[int]:
        self.refresh()
        if not self.fs.exists(self.path):
            return []
        steps = []
        for entry in self.fs.ls(self.path, detail=False):
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def is_complete(self, step: int) -> bool:
        self.refresh()
        return self.fs.exists(self.join(step_dir_name(step), COMPLETE_MARKER))

    def complete_steps(self) -> list[int]:
        return [s for s in self.step_dirs() if self.is_complete(s)]

    def meta(self, step: int) -> dict[str, Any]:
        """The completion record of a complete checkpoint (step, world_size, format)."""
        return json.loads(self.read_bytes(f"{step_dir_name(step)}/{COMPLETE_MARKER}"))

    def latest_step(self) -> int | None:
        """The step named by ``latest`` (verified complete), else the newest complete one."""
        pointer = self.join("latest")
        self.refresh()
        if self.fs.exists(pointer):
            name = self.fs.cat_file(pointer).decode().strip()
            match = STEP_DIR.match(name)
            if match and self.is_complete(int(match.group(1))):
                return int(match.group(1))
            log.warning(
                "checkpoint pointer %s names %r, which is not a complete checkpoint; scanning",
                pointer,
                name,
            )
        complete = self.complete_steps()
        return complete[-1] if complete else None

    def write_bytes(self, rel_path: str, data: bytes) -> None:
        """Write a small file so it is either whole or absent under its final name."""
        target = self.join(rel_path)
        if self.remote:
            self.fs.pipe_file(target, data)  # one PUT: atomic on object stores
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def read_bytes(self, rel_path: str) -> bytes:
        return self.fs.cat_file(self.join(rel_path))

    def exists(self, rel_path: str) -> bool:
        self.refresh()
        return self.fs.exists(self.join(rel_path))

    def remove_step(self, step: int) -> None:
        target = self.join(step_dir_name(step))
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def wipe(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def dcp_writer(store: CheckpointStore, step: int):
    if store.remote:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(store.url(step_dir_name(step)))
    return dcp.FileSystemWriter(store.join(step_dir_name(step)))


def dcp_reader(store: CheckpointStore, step: int):
    if store.remote:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(store.url(step_dir_name(step)))
    return dcp.FileSystemReader(store.join(step_dir_name(step)))


class DCPShards:
    """Model, optimizer and EMA tensors through DCP, which reshards them on load."""

    format = "dcp"

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any]) -> None:
        dcp.save(state, storage_writer=dcp_writer(store, step))

    def written(self, store: CheckpointStore, step: int) -> bool:
        """Whether every rank's part is on storage (checked on rank 0 before marking complete)."""
        return store.exists(f"{step_dir_name(step)}/.metadata")

    def load(
        self, store: CheckpointStore, step: int, state: dict[str, Any], saved_world_size: int
    ) -> None:
        dcp.load(state, storage_reader=dcp_reader(store, step))


class CheckpointManager:
    """Saves and restores training state collectively; every rank calls every method."""

    def __init__(
        self,
        root: str,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        async_save: bool,
        device: torch.device | None = None,
        shards: Any = None,
    ):
        self.store = CheckpointStore(root)
        self.shards = shards if shards is not None else DCPShards()
        assert not async_save or isinstance(self.shards, DCPShards), "async saves are DCP only"
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.async_save = async_save
        self.device = device or torch.device("cpu")
        self._pending: tuple[int, Any, dict] | None = None  # (step, future, meta) of an async save
        self._pg = None
        self._stager = None
        if async_save:
            self._setup_async()

    def _setup_async(self) -> None:
        """A gloo group for the background thread's collectives, and one reusable stager.

        DCP's default path copies the whole state into freshly allocated memory on every
        save, which was most of the time the loop stayed blocked (benchmarks/RESULTS.md).
        A stager kept for the run copies into the same host buffers each time; reuse is
        safe because a save waits for the previous one before staging again.
        """
        if self._pg is None and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.device.type == "cuda"
            options = StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
            self._stager = DefaultStager(options)

    # ------------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        dcp_state: dict[str, Any],
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        blocking: bool | None = None,
    ) -> float:
        """Save a checkpoint of ``step``; returns the seconds training was blocked."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        name = step_dir_name(step)
        if self.rank == 0 and self.store.step_dirs().count(step):
            self.store.remove_step(step)  # an earlier, incomplete attempt at the same step
        _barrier()
        self.store.write_bytes(f"{name}/rank_{self.rank:05d}.pt", _torch_bytes(rank_state))
        if self.rank == 0:
            self.store.write_bytes(f"{name}/trainer.pt", _torch_bytes(trainer_state))
        meta = {
            "step": step,
            "world_size": self.world_size,
            "saved_at": time.time(),
            "format": self.shards.format,
        }
        use_async = self.async_save if blocking is None else not blocking
        if use_async:
            self._setup_async()
            future = dcp.async_save(
                dcp_state,
                storage_writer=dcp_writer(self.store, step),
                process_group=self._pg,
                async_stager=self._stager,
            )
            self._pending = (step, future, meta)
        else:
            self.shards.save(self.store, step, dcp_state)
            _barrier()
            self._finalize(step, meta)
        return time.perf_counter() - start

    def poll(self) -> None:
        """Finish an async save whose writes are done (call once per step)."""
        if self._pending is not None:
            step, future, meta = self._pending
            done = _future_done(future)
            # Every rank must agree the save is done before rank 0 marks it complete.
            flag = torch.tensor([1 if done else 0], device=self.device)
            # (on the default group: the checkpoint group is busy in the background thread)
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item():
                _future_result(future)
                self._pending = None
                self._finalize(step, meta)

    def wait(self) -> None:
        """Block until an in-flight async save is complete and marked."""
        if self._pending is not None:
            step, future, meta = self._pending
            _future_result(future)
            self._pending = None
            _barrier()
            self._finalize(step, meta)

    def close(self) -> None:
        """Finish any save in flight and release the staging buffers."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _finalize(self, step: int, meta: dict) -> None:
        if self.rank == 0:
            name = step_dir_name(step)
            missing = [
                r
                for r in range(self.world_size)
                if not self.store.exists(f"{name}/rank_{r:05d}.pt")
            ]
            if missing or not self.shards.written(self.store, step):
                raise RuntimeError(
                    f"checkpoint {name} is missing files (ranks {missing}); not marking it complete"
                )
            self.store.write_bytes(f"{name}/{COMPLETE_MARKER}", json.dumps(meta).encode())
            self.store.write_bytes("latest", (name + "\n").encode())
            log.info("checkpoint %s complete at %s", name, self.store.url(name))
            self._retain()
        # no rank may exit (e.g. 75 after a stop signal) before 'latest' names this step:
        # srun --kill-on-bad-exit stops every node as soon as one launcher exits non-zero
        _barrier()

    def _retain(self) -> None:
        if self.keep_last <= 0:
            return
        complete = self.store.complete_steps()
        for old in complete[: -self.keep_last]:
            self.store.remove_step(old)

    def clean_incomplete(self) -> None:
        """Remove step directories a crash left without their completion marker (rank 0)."""
        if self.rank == 0:
            latest = self.store.latest_step()
            for step in self.store.step_dirs():
                if not self.store.is_complete(step) and (latest is None or step != latest):
                    log.warning("removing incomplete checkpoint %s", step_dir_name(step))
                    self.store.remove_step(step)
        _barrier()

    # ------------------------------------------------------------------------ loading
    def load_latest(self, dcp_state: dict[str, Any]) -> LoadedCheckpoint | None:
        """Load the newest complete checkpoint into ``dcp_state`` (in place); None if none."""
        step = self.store.latest_step()
        if step is None:
            return None
        return self.load(step, dcp_state)

    def latest_meta(self) -> dict[str, Any] | None:
        """The completion record of the checkpoint a resume would load (None if none);
        ConfigError if another backend wrote it."""
        step = self.store.latest_step()
        if step is None:
            return None
        meta = self.store.meta(step)
        self._check_format(step, meta)
        return meta

    def _check_format(self, step: int, meta: dict[str, Any]) -> None:
        saved_format = meta.get("format", "dcp")
        if saved_format != self.shards.format:
            from configlib import ConfigError

            raise ConfigError(
                [
                    f"parallel.backend: checkpoint {self.store.url(step_dir_name(step))} holds "
                    f"{saved_format} shards, this run writes {self.shards.format}; resume with "
                    "the backend that wrote it, or start over (--fresh or a new run.output_dir)"
                ]
            )

    def load(self, step: int, dcp_state: dict[str, Any]) -> LoadedCheckpoint:
        name = step_dir_name(step)
        if not self.store.is_complete(step):
            raise FileNotFoundError(f"checkpoint {self.store.url(name)} is not complete")
        meta = json.loads(self.store.read_bytes(f"{name}/{COMPLETE_MARKER}"))
        saved_world = int(meta["world_size"])
        self._check_format(step, meta)
        self.shards.load(self.store, step, dcp_state, saved_world)
        trainer_state = _torch_load(self.store.read_bytes(f"{name}/trainer.pt"))
        all_rank_states = [
            _torch_load(self.store.read_bytes(f"{name}/rank_{r:05d}.pt"))
            for r in range(saved_world)
        ]
        mine = all_rank_states[self.rank] if self.rank < saved_world else None
        return LoadedCheckpoint(step, trainer_state, mine, all_rank_states, saved_world)


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _future_done(future: Any) -> bool:
    target = getattr(future, "upload_completion", future)
    return target.done()


def _future_result(future: Any) -> None:
    target = getattr(future, "upload_completion", future)
    target.result()
