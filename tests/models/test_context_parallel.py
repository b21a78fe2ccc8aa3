"""Context parallel (Ulysses) on 2 real gloo ranks: the video DiT (full and factorised
attention) and the audio DiT with their tokens split across the ranks give the output,
loss and (rank-averaged) gradients of the whole model, with half the attention input on
each rank."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.common.context_parallel import ContextParallel, enable_context_parallel

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report():
    port = free_port()
    procs = []
    for rank in range(2):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, str(REPO / "tests/models/context_parallel_worker.py")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["video_full", "video_factorized", "audio"])
def test_split_sequence_matches_the_whole_model(report, family):
    got = report[family]
    assert got["out"] < 1e-4 and got["loss"] < 1e-5 and got["grad"] < 1e-4, got


@pytest.mark.parametrize("family", ["video_full", "video_factorized", "audio"])
def test_attention_input_per_rank_is_halved(report, family):
    whole, split = report[family]["attention_input"]
    assert split * 2 == whole, (whole, split)


def test_indivisible_tokens_or_heads_is_one_clear_error():
    cp = ContextParallel.__new__(ContextParallel)
    cp.size = 2
    with pytest.raises(ValueError, match=r"tokens \(33\) and heads \(4\) divisible by 2"):
        cp.check(33, 4)
    with pytest.raises(ValueError, match="does not support context parallelism"):
        enable_context_parallel(torch.nn.Linear(2, 2), None)
