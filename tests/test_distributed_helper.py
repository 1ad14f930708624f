"""tests/distributed.run fails the test whenever a rank fails - in the body, in process-group init, in teardown,
or by dying without raising - names the rank, and never hangs on the surviving peer. In the failure cases the
surviving rank does not wait for the dead one, except where a peer blocked on the dead rank is the point."""
import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import distributed


def _all_reduce(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")


def _exit_3_on_rank_1(rank, world):
    if rank == 1:
        os._exit(3)


def _killed_on_rank_1(rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def _exit_0_on_rank_1_while_rank_0_waits(rank, world):
    """Rank 1 leaves "successfully" from inside the body; rank 0 waits for it in a collective."""
    if rank == 1:
        os._exit(0)
    dist.barrier()


def _teardown_fails(rank, world):
    if rank == 1:
        dist.destroy_process_group()  # the helper's own destroy then has no group to destroy


class _InitFailsOnRank1:
    """A body whose unpickling, in the spawned rank-1 process, names a network interface that does not exist,
    so that gloo's device creation inside init_process_group fails there (rank 0 is left in the rendezvous)."""

    def __init__(self):
        self.interface = "no-such-interface0"

    def __setstate__(self, state):
        self.__dict__.update(state)
        if multiprocessing.current_process().name == "rank 1":
            os.environ["GLOO_SOCKET_IFNAME"] = self.interface

    def __call__(self, rank, world):
        pass


def test_a_passing_body_passes():
    distributed.run(_all_reduce, world=2)


@pytest.mark.parametrize("body,expected,peer_fails", [
    (_raise_on_rank_1, "ValueError: boom on rank 1", False),
    (_exit_3_on_rank_1, "exit code 3", False),
    (_killed_on_rank_1, "killed by signal SIGKILL", False),
    # rank 0's barrier then fails too (the connection is reset): reported as well, or terminated
    (_exit_0_on_rank_1_while_rank_0_waits, "exit code 0 without reporting success", True),
    (_teardown_fails, "destroy_process_group", False),
    (_InitFailsOnRank1(), "no-such-interface0", True),
], ids=["raises", "exit-3", "signal", "exit-0", "teardown", "init"])
def test_a_failing_rank_fails_the_test_and_is_named(body, expected, peer_fails):
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        distributed.run(body, world=2)
    message = str(info.value)
    assert "rank 1 failed: " in message and expected in message.split("rank 1 failed: ")[1], message
    assert peer_fails or "rank 0 failed" not in message, message
    assert time.monotonic() - start < 60  # the peer left waiting on rank 1 was not waited for


def test_auto_backend_is_gloo_without_a_gpu_per_rank():
    assert distributed.resolve_backend("auto", 2) == ("nccl" if distributed.use_nccl(2) else "gloo")
    assert distributed.resolve_backend("gloo", 2) == "gloo"
