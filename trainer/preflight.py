"""Look up everything a recipe reads or writes before any rank starts.

``check_run(cfg)`` walks the inputs (shards, tokenizer models, text-encoder weights) and
outputs (checkpoint dir, run dir) a recipe names, asks the store about each, and returns
one :class:`Found` row per item. The launcher stops on the problems (one ``error:``
block, exit 2) and ``trainer.launch RECIPE --check`` prints the rows as a table.

A store that cannot answer now (a transient error, fsspec's HTTP store) is not a
problem: the ranks retry it. Missing or rejected credentials, an endpoint that refuses
connections, a missing bucket and denied access are (:mod:`data_pipeline.storage`).
Once a store failed like that, its other items are not asked again (each try of an
unreachable endpoint costs seconds of retries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from data_pipeline.storage import InputError, check_writable, lookup

Kind = Literal["shards", "file", "folder", "writable"]


@dataclass
class Found:
    key: str
    url: str
    kind: Kind
    status: str  # what the store said, for the table
    problem: str | None = None  # the error line's text, KEY: ... (None: fine)
    reason: str | None = None  # why the store refused (InputError), shared by its items

    @property
    def remote(self) -> bool:
        return "://" in self.url


def run_items(cfg: Any) -> list[tuple[str, str, Kind]]:
    """(recipe key, URL or path, what must be there) for everything the run touches."""
    items: list[tuple[str, str, Kind]] = []
    urls = getattr(cfg.data, "urls", None)
    if urls:
        items.append(("data.urls", urls if isinstance(urls, str) else ",".join(urls), "shards"))
    for section in ("data", "objective"):
        url = getattr(getattr(cfg, section), "tokenizer", None)
        if isinstance(url, str) and url:
            items.append((f"{section}.tokenizer", url, "file"))
    conditioning = getattr(cfg.objective, "conditioning", None)
    if conditioning is not None and getattr(conditioning, "source", None) == "encoders":
        encoders = [(f"clip[{i}]", enc) for i, enc in enumerate(conditioning.clip)]
        encoders += [("t5", conditioning.t5)] if conditioning.t5 is not None else []
        for name, enc in encoders:
            key = f"objective.conditioning.{name}"
            if enc.path and not enc.random_init:
                items.append((f"{key}.path", enc.path, "folder" if name == "t5" else "file"))
            if getattr(enc, "tokenizer_path", None):
                kind: Kind = "file" if enc.tokenizer_path.endswith(".model") else "folder"
                items.append((f"{key}.tokenizer_path", enc.tokenizer_path, kind))
    autoencoder = getattr(cfg.objective, "autoencoder", None)
    if getattr(autoencoder, "path", None) and not getattr(autoencoder, "random_init", False):
        kind = "file" if autoencoder.path.endswith(".safetensors") else "folder"
        items.append(("objective.autoencoder.path", autoencoder.path, kind))
    perceptual = getattr(cfg.objective, "perceptual", "none")
    if perceptual != "none":
        items.append(("objective.perceptual", perceptual, "file"))
    ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, "checkpoints")
    items.append(
        ("checkpoint.dir" if cfg.checkpoint.dir else "run.output_dir", ckpt_root, "writable")
    )
    if cfg.checkpoint.dir:
        items.append(("run.output_dir", cfg.run.output_dir, "writable"))
    return items


def _store(url: str) -> str:
    """The store an item lives in (scheme and bucket); local paths share one."""
    if "://" not in url:
        return "local"
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def check_item(key: str, url: str, kind: Kind) -> Found:
    from data_pipeline.loader import DataError, find_shards

    def found(status: str, problem: str | None = None) -> Found:
        return Found(key, url, kind, status, problem)

    try:
        if kind == "writable":
            ok = check_writable(key, url)
            return found("writable" if ok else "not checked (the store cannot answer now)")
        if kind == "shards":
            try:
                shards = find_shards(url.split(",") if "," in url else url)
            except DataError as err:
                return found("missing", str(err))
            except InputError:
                raise
            except Exception:
                return found("not checked (the store cannot answer now)")
            first = lookup(key, shards[0])
            if first == "missing":
                return found("missing", f"{key}: shard {shards[0]} does not exist")
            return found(f"{len(shards)} shards")
        what = lookup(key, url)
        if what is None:
            return found("not checked (the store cannot answer now)")
        if what == "missing":
            return found("missing", f"{key}: {url} does not exist")
        if kind == "file" and what == "directory":
            noun = ".model file" if key.endswith(".tokenizer") else "file"
            return found("a folder", f"{key}: {url} is a folder, not a {noun}")
        if kind == "folder" and what == "file":
            return found("a file", f"{key}: {url} is a file, not a folder")
        local_model = kind == "folder" and key.endswith(".path") and "://" not in url
        if local_model and not os.path.isfile(os.path.join(url, "config.json")):
            return found("no config.json", f"{key}: {url} has no config.json")
        return found(what)
    except InputError as err:
        return Found(key, url, kind, err.reason.split(":", 1)[0], str(err), err.reason)


def check_run(cfg: Any) -> list[Found]:
    """A row for every item of :func:`run_items`, in order."""
    failed: dict[str, str] = {}  # store -> the reason it failed (not asked again)
    rows = []
    for key, url, kind in run_items(cfg):
        store = _store(url)
        if store in failed:
            reason = failed[store]
            status = f"not asked: {store} failed above"
            rows.append(Found(key, url, kind, status, f"{key}: {url}: {reason}", reason))
            continue
        row = check_item(key, url, kind)
        if row.reason is not None and store != "local":
            failed[store] = row.reason
        rows.append(row)
    return rows


def check_inputs(cfg: Any) -> list[str]:
    """The problems :func:`check_run` finds, as ``KEY: ...`` lines."""
    return [row.problem for row in check_run(cfg) if row.problem]


def format_table(rows: list[Found]) -> str:
    width_key = max(len(r.key) for r in rows)
    width_url = min(60, max(len(r.url) for r in rows))
    lines = []
    for row in rows:
        mark = "ok " if row.problem is None else "ERR"
        lines.append(f"{mark} {row.key:<{width_key}}  {row.url:<{width_url}}  {row.status}")
    return "\n".join(lines)
