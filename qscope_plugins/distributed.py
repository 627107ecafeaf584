"""Data-parallel runs under ``torchrun`` / ``accelerate launch``: the one home of ``torch.distributed``.

The resumable jobs (``qscope footprint``, ``qscope index``, ``qscope eval-sae`` and the classifier's
activation capture) take a :class:`World` and split their *batches* (fixed slices of the samples, by
position) round-robin over its ranks. Each batch is computed exactly as a single process computes it,
so a merged result does not depend on the number of ranks: stores are byte-identical and sums are
folded on every rank in batch order (bit-identical floats). Recipes never import ``torch.distributed``;
they call the :class:`World` they are given. Scaling guide and cost model: docs/scaling.md.

Launch detection: ``WORLD_SIZE`` > 1 in the environment (set by ``torchrun`` and ``accelerate launch``)
with ``RANK`` and ``LOCAL_RANK``. The process group is NCCL when this rank computes on CUDA, else gloo;
every collective here moves small Python objects, always over a gloo group. Without a launcher,
:func:`launched` yields the single-process world and touches nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["RankFailed", "World", "launched", "rank_device", "rank_gpus", "read_world", "SINGLE"]


class RankFailed(RuntimeError):
    """Another rank of this run failed; its message is repeated here so every rank exits alike."""


@dataclass
class World:
    """Who this process is in a data-parallel run (``size`` 1: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    """``"gloo"`` or ``"nccl"`` while a process group is up, else ``None``."""
    _group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of ``items``: every ``size``-th one from position ``rank`` (deterministic)."""
        return list(items[self.rank :: self.size])

    # ---- collectives (no-ops in a single process) ------------------------------------------------
    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.parallel:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank. An exception there is raised on
        every rank (rank 0: the original; the others: a ``UsageError`` or ``ValueError`` with the same
        message, else :class:`RankFailed` naming it), so no rank waits on a collective rank 0 never reaches."""
        if not self.parallel:
            return fn()
        outcome: tuple = ("ok", None)
        error = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as err:
                error, outcome = err, ("error", _portable(err))
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise _rebuilt(outcome[1], 0)
        return outcome[1]

    def all_ok(self, error: BaseException | None) -> None:
        """After each rank's own work: raise on every rank when any rank failed (the lowest rank's error)."""
        if not self.parallel:
            if error is not None:
                raise error
            return
        reports = self.gather(None if error is None else _portable(error))
        for rank, report in enumerate(reports):
            if report is not None:
                if rank == self.rank and error is not None:
                    raise error
                raise _rebuilt(report, rank)

    def agree(self, what: str, settings: Mapping[str, Any]) -> None:
        """Refuse to go on unless every rank has the same ``settings`` (named keys are compared by a
        digest of their JSON form, so long sample lists cost nothing to send)."""
        if not self.parallel:
            return
        digests = {key: _digest(value) for key, value in settings.items()}
        every = self.gather(digests)
        differing = sorted({key for other in every for key in set(other) | set(digests)
                            if other.get(key) != every[0].get(key)})
        if differing:
            ranks = [r for r, other in enumerate(every) if other != every[0]]
            raise ValueError(f"the ranks of this run disagree on the {what} settings {', '.join(differing)} "
                             f"(rank {ranks[0]} differs from rank 0); launch every rank with the same command and inputs")

    def device(self, requested: str) -> str:
        """See :func:`rank_device`."""
        return rank_device(requested, self)


SINGLE = World()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _portable(err: BaseException) -> tuple[str, str]:
    """What crosses ranks about an error: its kind and one-line message (exceptions need not pickle)."""
    kind = "usage" if type(err).__name__ == "UsageError" else "value" if isinstance(err, ValueError) else type(err).__name__
    return kind, str(err)


def _rebuilt(report: tuple[str, str], rank: int) -> BaseException:
    kind, message = report
    if kind == "usage":  # the CLI's exit status (2) is kept on every rank
        from .cli._options import UsageError

        return UsageError(message)
    if kind == "value":
        return ValueError(message)
    return RankFailed(f"rank {rank} failed: {kind}: {message}")


# ---- environment ---------------------------------------------------------------------------------
def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun / accelerate)") from None


def read_world() -> World:
    """The world the launcher describes in the environment (no process group is started)."""
    size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", rank if size > 1 else 0)
    local_size = _int_env("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
        raise ValueError(f"inconsistent launcher environment: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank}, "
                         f"LOCAL_WORLD_SIZE={local_size}")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)


def rank_device(requested: str, world: World) -> str:
    """The device a rank computes on: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under a launcher (``auto``
    stays CPU without CUDA); ``cuda:N``, ``cpu`` and ``mps`` are kept (with ``CUDA_VISIBLE_DEVICES`` set per
    rank, each rank's ``cuda:0`` is its own GPU). A single process keeps ``requested``."""
    if not world.parallel or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu" if requested == "auto" else requested  # the CLI's device check names the problem
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ValueError(f"LOCAL_RANK {world.local_rank} has no GPU of its own: {count} CUDA device(s) are visible; "
                         f"launch at most {count} processes per node (--nproc_per_node)")
    return f"cuda:{world.local_rank}"


def rank_gpus(world: World, gpus_per_rank: int, visible: int) -> list[int]:
    """The GPU indices a rank shards its model over (``device_map="auto"`` with ``max_memory`` limited to
    them): ``gpus_per_rank`` consecutive ones starting at ``LOCAL_RANK * gpus_per_rank``."""
    if gpus_per_rank < 1:
        raise ValueError(f"gpus_per_rank must be >= 1, got {gpus_per_rank}")
    first = world.local_rank * gpus_per_rank
    if first + gpus_per_rank > visible:
        raise ValueError(f"LOCAL_RANK {world.local_rank} with {gpus_per_rank} GPUs per rank needs GPUs "
                         f"{first}..{first + gpus_per_rank - 1}, but {visible} are visible; "
                         f"launch at most {visible // gpus_per_rank} processes per node")
    return list(range(first, first + gpus_per_rank))


def _disarm_other_ranks(world: World) -> None:
    """``QSCOPE_CRASH_RANK=r`` keeps the crash point (``QSCOPE_CRASH_AT``) armed on rank ``r`` only."""
    wanted = os.environ.get("QSCOPE_CRASH_RANK")
    if wanted not in (None, "") and int(wanted) != world.rank:
        from . import _io

        _io.arm_crash(0)


@contextlib.contextmanager
def launched(device: str = "cpu") -> Iterator[World]:
    """The :class:`World` of this process for the duration of the block.

    Under a launcher (``WORLD_SIZE`` > 1) a process group is started, NCCL when ``device`` (this rank's
    resolved device) is CUDA, else gloo, and destroyed at the end; an already started group (a caller's
    own) is reused and left up. Otherwise the single-process world, and nothing is started.
    """
    world = read_world()
    if not world.parallel:
        yield SINGLE
        return
    import torch.distributed as dist

    _disarm_other_ranks(world)
    started = not dist.is_initialized()
    if started:
        cuda = str(device).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
    backend = dist.get_backend()
    group = dist.new_group(backend="gloo") if backend != "gloo" else None
    try:
        yield World(world.rank, world.size, world.local_rank, world.local_size, backend, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def command_world(args, command: str) -> Iterator[World]:
    """The world of one ``qscope`` command: under a launcher, ``args.device`` becomes this rank's device
    (:func:`rank_device`), the process group is started, and every rank must have been given the same
    command line (``--device`` aside), else the run is refused naming the differing options."""
    world = read_world()
    if not world.parallel:
        yield SINGLE
        return
    args.device = rank_device(args.device, world)
    from .cli._options import as_usage_errors

    with launched(args.device) as world:
        options = {key: value for key, value in vars(args).items() if key != "device" and not callable(value)}
        with as_usage_errors():  # a launch whose ranks got different command lines is a wrong command line: exit 2
            world.agree(f"{command} command-line", options)
        yield world
