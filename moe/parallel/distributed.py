"""Data parallelism: the process group as a context manager, and the rank facts training needs.

The environment comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or from SLURM tasks (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, e.g. `srun python ...`); under submitit, studies export submitit's
TorchDistributedEnvironment first, which sets the torchrun names. MASTER_ADDR/MASTER_PORT name the
rendezvous (127.0.0.1:29500 when unset, i.e. one node). World size 1 creates no process group at all,
so single-process training runs exactly the code it ran before.

Rank failures: inside the group every rank runs a heartbeat thread that counts up a key in the
rendezvous store and watches the others'. A rank that leaves on an exception first writes its reason
there. A rank whose count stops moving for `peer_timeout_s` (killed, frozen, node lost) or that wrote a
reason is a failed peer, and so is a store host that stops answering: the survivors end within about
that time instead of waiting out the process-group timeout. A collective that fails on a survivor (gloo notices a closed connection at once) is re-raised
by `explains_rank_failures` as `PeerFailure` naming the rank and the reason; a survivor stuck in a
collective that never returns (NCCL) is ended by its heartbeat thread (`on_peer_failure`, then exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes; 1 means no process group."""
    local_rank: int
    """Rank on this node; picks the CUDA device."""
    device: torch.device
    """Device this rank trains on."""

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes checkpoints."""
        return self.rank == 0


def read_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    try:
        rank, world, local = (int(env.get(k, "0")) for k in keys)
    except ValueError as exc:
        raise ValueError(f"{'/'.join(keys)} must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{keys[0]}={rank} must be in [0, {keys[1]}={world})")
    return rank, world, local


class PeerFailure(RuntimeError):
    """Another rank of the group failed (died, stopped responding, or raised); this rank stops too."""

    def __init__(self, rank: int | None, reason: str):
        who = f"rank {rank}" if rank is not None else "the rendezvous store"
        super().__init__(f"{who} failed: {reason}")
        self.rank, self.reason = rank, reason


_KEY = "moe/heartbeat/{}"
_MONITOR: Heartbeat | None = None


class Heartbeat:
    """Beats this rank's key in the store every `period_s` and watches every other rank's key."""

    def __init__(
        self,
        rank: int,
        world: int,
        period_s: float,
        timeout_s: float,
        on_failure: Callable[[PeerFailure], None] | None,
    ):
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # A client of its own: the training thread's store calls are not interleaved with these.
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(timeout_s, 5)))
        self.rank, self.world, self.period_s, self.timeout_s = rank, world, period_s, timeout_s
        self.on_failure = on_failure
        self.failure: PeerFailure | None = None
        self.handled = threading.Event()  # the training thread reported the failure itself
        self._stop = threading.Event()
        self._once = threading.Lock()
        self._beat = 0
        self.store.set(_KEY.format(rank), "0")
        self._answered = time.monotonic()  # the store's last answer to this client
        self._thread = threading.Thread(target=self._run, name="moe-heartbeat", daemon=True)
        self._thread.start()
        # A frozen store host (SIGSTOP, a hung node) keeps the connection open and never answers: the
        # client's calls then block past their timeout, so a second thread watches the answers' age.
        threading.Thread(target=self._watch_store, name="moe-heartbeat-store", daemon=True).start()

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        store_errors = 0
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            try:
                self._beat += 1
                self.store.set(_KEY.format(self.rank), str(self._beat))
                store_errors = 0
                for r in range(self.world):
                    if r == self.rank or not self.store.check([_KEY.format(r)]):
                        continue  # not joined yet: the process-group rendezvous waits for it
                    value = self.store.get(_KEY.format(r)).decode()
                    if value.startswith("failed:"):
                        return self._fail(r, value.removeprefix("failed:"))
                    if value == "done":
                        continue
                    if seen.get(r, ("", 0.0))[0] != value:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > self.timeout_s:
                        return self._fail(
                            r,
                            f"no heartbeat for {now - seen[r][1]:.0f} s (killed, hung, or its node is lost)",
                        )
                self._answered = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - any store error means the store's host is gone
                store_errors += 1
                if self._stop.is_set():
                    return
                if store_errors >= 2:
                    host = os.environ.get("MASTER_ADDR")
                    return self._fail(
                        0 if _store_on_rank0() else None,
                        f"the rendezvous store at {host} is unreachable ({type(exc).__name__}: {exc})",
                    )

    def _watch_store(self) -> None:
        while not self._stop.wait(self.period_s):
            silent = time.monotonic() - self._answered
            if silent > self.timeout_s + self.period_s:
                host = os.environ.get("MASTER_ADDR")
                return self._fail(
                    0 if _store_on_rank0() else None,
                    f"the rendezvous store at {host} has not answered for {silent:.0f} s (frozen or lost)",
                )

    def _fail(self, rank: int | None, reason: str) -> None:
        if not self._once.acquire(blocking=False):
            return  # the other watching thread found a failure first
        self.failure = PeerFailure(rank, reason)
        print(f"[rank {self.rank}] {self.failure}; ending this rank", file=sys.stderr, flush=True)
        if self.handled.wait(5.0):  # the training thread raised it as an exception: let that unwind
            return
        if self.on_failure is not None:
            try:
                self.on_failure(self.failure)
            except Exception as exc:  # noqa: BLE001 - still end the process
                print(f"[rank {self.rank}] on_peer_failure raised {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)  # the training thread is stuck in a collective: nothing else would end it

    def wait_for_verdict(self, timeout_s: float) -> PeerFailure | None:
        """The failed peer, waiting up to timeout_s for the heartbeat to find it."""
        self.handled.set()
        deadline = time.monotonic() + timeout_s
        while self.failure is None and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failure

    def leave(self, reason: str | None) -> None:
        """Stop watching; tell the others this rank is done, or why it failed."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.set(_KEY.format(self.rank), "done" if reason is None else f"failed:{reason}")
        self._thread.join(timeout=self.period_s + 1)


def _store_on_rank0() -> bool:
    """Without torchrun's agent, rank 0 hosts the rendezvous store."""
    return "TORCHELASTIC_RUN_ID" not in os.environ


def _from_a_collective(exc: BaseException) -> bool:
    """Whether `exc` looks like a broken collective (gloo raises a plain RuntimeError naming itself)."""
    words = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")
    return isinstance(exc, dist.DistError) or any(w in str(exc).lower() for w in words)


def explains_rank_failures(fn: Callable) -> Callable:
    """Re-raise an error from `fn` as PeerFailure when the heartbeat finds a failed peer (a collective
    broke because another rank died)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            if _MONITOR is None or isinstance(exc, PeerFailure) or not _from_a_collective(exc):
                raise
            failure = _MONITOR.wait_for_verdict(_MONITOR.timeout_s + 2 * _MONITOR.period_s)
            if failure is None:
                raise
            raise failure from exc

    return wrapper


@contextlib.contextmanager
def distributed_env(
    device: str = "auto",
    timeout_s: float = 600.0,
    *,
    heartbeat_s: float = 2.0,
    peer_timeout_s: float = 30.0,
    on_peer_failure: Callable[[PeerFailure], None] | None = None,
) -> Iterator[DistEnv]:
    """Join the process group described by the environment (nccl on CUDA, gloo on CPU); leave it on exit.

    device: auto (cuda when available), cpu or cuda; each rank takes cuda:LOCAL_RANK. Inside, `train`
    sees the group and trains data-parallel.
    timeout_s: the process group's collective timeout. heartbeat_s / peer_timeout_s: how often ranks
    beat, and how long a silent rank is waited for before it counts as failed (0 disables the
    heartbeat). on_peer_failure: called (from the heartbeat thread) before this rank exits when the
    training thread is stuck in a collective, e.g. to record the failure."""
    rank, world, local = read_env()
    # cuda asked for on a machine without it: train() raises the config error, recorded like any failure
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1 or dist.is_initialized():  # a caller that already joined keeps its group
        yield DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
        return
    global _MONITOR
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    if heartbeat_s > 0:
        _MONITOR = Heartbeat(rank, world, heartbeat_s, peer_timeout_s, on_peer_failure)
    reason = None
    try:
        yield DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        monitor, _MONITOR = _MONITOR, None
        if monitor is not None:
            if reason is None:  # nobody leaves before all stopped watching (rank 0 may host the store)
                monitor.store.set(_KEY.format(rank), "done")
                with contextlib.suppress(Exception):
                    dist.barrier()
            monitor.leave(reason)
        dist.destroy_process_group()


def active_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (a no-op without a process group); returns `t`."""
    if active_world()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if active_world()[1] > 1:
        dist.barrier()
