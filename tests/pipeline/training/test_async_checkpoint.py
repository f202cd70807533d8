"""The asynchronous checkpoint writer on its own: what it writes is the state at the moment of the save,
durable and hashed, and a failed write is reported. (A SIGKILL during an asynchronous save, resume and
a full disk are in tests/pipeline/run/test_faults.py and test_orchestrate.py; with async_checkpoint on by
default, every resume test of the suite goes through it.)"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from pipeline.run.artifacts import file_sha256
from pipeline.training.async_checkpoint import BUSY, FAILED, IDLE, SnapshotWriter, host_copy


def test_a_host_copy_keeps_the_values_of_the_moment_and_the_containers():
    weight, step = torch.ones(3), torch.tensor(7)
    state = OrderedDict(module={"weight": weight}, optimizer=[{"step": step, "lr": 1e-3}], shapes=(torch.Size([3]),))
    copy = host_copy(state)
    weight.add_(1)
    step.add_(1)
    assert torch.equal(copy["module"]["weight"], torch.ones(3)) and int(copy["optimizer"][0]["step"]) == 7
    assert isinstance(copy, OrderedDict) and isinstance(copy["shapes"], tuple)
    assert copy["optimizer"][0]["lr"] == 1e-3 and copy["shapes"][0] == torch.Size([3])


def test_the_writer_saves_the_state_as_it_was_when_asked_and_hashes_it(tmp_path):
    writer = SnapshotWriter(TorchCheckpointEngine())
    weight = torch.arange(1_000_000, dtype=torch.float32)
    path = tmp_path / "step-1" / "model_states.pt"
    path.parent.mkdir()
    writer.save({"weight": weight}, str(path))
    weight.zero_()  # training goes on while the thread writes
    assert writer.status() in (BUSY, IDLE)
    writer.wait()
    assert writer.status() == IDLE
    assert torch.equal(torch.load(path)["weight"], torch.arange(1_000_000, dtype=torch.float32))
    digests = writer.digests_under(tmp_path / "step-1")
    assert digests == {"model_states.pt": {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}
    assert writer.digests_under(tmp_path / "step-1") == {}  # handed over once


def test_a_failed_write_is_reported_when_waited_for(tmp_path):
    writer = SnapshotWriter(TorchCheckpointEngine())
    writer.save({"weight": torch.ones(2)}, str(tmp_path / "missing-directory" / "model_states.pt"))
    while writer.status() == BUSY:
        pass
    assert writer.status() == FAILED
    with pytest.raises(OSError):
        writer.wait()


def test_inside_synchronous_a_save_is_written_before_it_returns(tmp_path):
    writer = SnapshotWriter(TorchCheckpointEngine())
    writer.save({"weight": torch.ones(2)}, str(tmp_path / "early.pt"))  # still in flight when the block starts
    with writer.synchronous():
        assert (tmp_path / "early.pt").is_file()  # the block waits for what was queued
        writer.save({"weight": torch.zeros(2)}, str(tmp_path / "last.pt"))
        assert torch.equal(torch.load(tmp_path / "last.pt")["weight"], torch.zeros(2))
    assert writer.futures == [] and not writer.inline
