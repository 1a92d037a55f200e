"""Training under ``torch.distributed``: one process per device, each on its shard of every global batch.

Started by ``torchrun --nproc-per-node N -m routerkit train CFG`` (or ``routerkit train CFG --nproc N``,
which runs torchrun for you), every process runs the same stages on the same data with the same
seeds. The shuffled order of an epoch is drawn from the stage's generator, identical on every rank;
each global batch of ``batch_size`` inputs is then cut into one contiguous shard per rank
(`routerkit.data.shard_of`, with `Distributed.part`), so N processes see together exactly the batches one process would.

Gradients are all-reduced before every optimiser step:

- by ``DistributedDataParallel`` for a module every rank runs on every step (the pre-trained
  models, the policy network): `Distributed.wrap`;
- by `Distributed.sync_gradients` for a model whose share of a batch depends on the routing
  decisions (the joint fine-tune trains ``f_i`` only on the units routed to it, so a rank may run it
  on none; a DDP forward would then wait for it forever).

Either way a rank's mean loss over its shard is weighted by its share of the global batch
(`Distributed.loss_scale`, or by counts summed over the ranks), so the all-reduced gradient is that
of the mean over the global batch, as in one process. Random draws
per sample (augmentation, sampled actions) come from a per-rank generator (`Distributed.draws`).
Rank 0 alone writes checkpoints, logs, tables and figures; the others only train.

The backend is ``nccl`` when the run trains on CUDA and ``gloo`` on the CPU; the code path is the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Distributed", "Method", "distributed", "launch_command", "setup_distributed", "teardown_distributed"]

#: Salt of the per-rank generators (rank r draws from seed + (r + 1) * _RANK_SALT: never the stage's own stream).
_RANK_SALT = 1_000_003


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a distributed run (one process: rank 0 of 1).

    Attributes:
        rank: This process's rank.
        world_size: Processes in the run.
        local_rank: Rank on this machine (its CUDA device index).
        backend: ``"gloo"``, ``"nccl"`` or ``""`` (not distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for `routerkit.data.BaseSplit.index_batches`, ``None`` in one process."""
        return (self.rank, self.world_size) if self.enabled else None

    def local_count(self, total: int) -> int:
        """Inputs of a global batch of ``total`` that are this rank's (`routerkit.data.shard_of`; 0 if none)."""
        if not self.enabled:
            return total
        share, extra = divmod(total, self.world_size)  # the sizes torch.tensor_split gives: the first `extra` get one more
        return share + (self.rank < extra)

    def counts(self, total: int) -> float:
        """1.0 if this rank holds inputs of a global batch of ``total``, 0.0 if it only repeats one (`shard_of`)."""
        return float(self.local_count(total) > 0)

    def loss_scale(self, total: int) -> float:
        """Factor of this rank's mean loss so that DDP's averaged gradient is the mean over the global batch.

        DDP averages gradients over ranks; ``mean_local * local * world / total`` averaged over the
        ranks is the mean over all ``total`` inputs (0 for a rank that only repeats an input).
        """
        if not self.enabled:
            return 1.0
        return self.local_count(total) * self.world_size / total if total else 0.0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` (itself when not distributed).

        The wrapper shares the module's parameters; call it (not the module) in the training step.
        """
        if not self.enabled:
            return module
        if not any(p.requires_grad for p in module.parameters()):
            return module
        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def sync_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of ``parameters`` over the ranks; a missing gradient counts as zero.

        Every rank must call it for the same parameters, in the same order, also when it computed
        no gradient for them. Weight each rank's mean loss by its count over the count summed over
        the ranks (`all_sum`), so that the sum is the gradient of the mean over all of them.
        """
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        # Which parameters have a gradient on some rank: one that none has keeps none, as in one process
        # (an optimiser then skips it: no momentum, no weight decay, no step counted).
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=self._device())
        dist.all_reduce(has)
        params = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n

    def all_sum(self, value: float) -> float:
        """``value`` summed over the ranks (itself when not distributed)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def mean(self, values: Tensor, weight: float = 1.0) -> Tensor:
        """The mean of ``values`` over every rank's elements (``values.mean()`` in one process).

        ``weight`` 0 leaves this rank's elements out (a rank that only repeats an input).
        """
        if not self.enabled:
            return values.mean()
        total = values.detach().sum().double().to(self._device()) * weight
        t = torch.stack([total, torch.tensor(values.numel() * weight, dtype=torch.float64, device=self._device())])
        dist.all_reduce(t)
        return (t[0] / t[1].clamp_min(1.0)).to(values.dtype).to(values.device)

    def split_global_rng(self) -> None:
        """Give each rank its own stream of the global generators (dropout, MC-dropout passes), derived from the current one.

        Called once the ranks agree on the global state (after building the experiment, after loading
        a checkpoint); a no-op in one process.
        """
        if not self.enabled:
            return
        base = int(torch.randint(0, 2**62, (1,)).item())
        torch.manual_seed((base + (self.rank + 1) * _RANK_SALT) % (2**63))

    def broadcast_state(self, *modules: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers of ``modules`` (in place)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def sum_by_key(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed key by key over the ranks (a key a rank lacks counts as 0)."""
        if not self.enabled:
            return dict(values)
        out: dict[str, float] = {}
        for part in self.gather(values):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + float(value)
        return out

    def draws(self, seed: int) -> torch.Generator | None:
        """A per-rank generator for random draws per sample, or ``None`` (use the stage's own) in one process."""
        if not self.enabled:
            return None
        return torch.Generator().manual_seed((int(seed) + (self.rank + 1) * _RANK_SALT) % (2**63))

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` when not distributed)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


class Method(nn.Module):
    """``module.<method>`` as a module's ``forward``, for wrapping in DDP (e.g. a router's ``logits``)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.inner, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


_CURRENT = Distributed()


def distributed() -> Distributed:
    """This process's `Distributed` (rank 0 of 1 unless `setup_distributed` joined a group)."""
    return _CURRENT


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun described in the environment (``WORLD_SIZE`` > 1), once.

    Args:
        device: The run's device (``run.device``): ``cuda`` selects the ``nccl`` backend and this
            rank's GPU (``cuda:LOCAL_RANK``), anything else ``gloo``.

    Returns:
        The process's `Distributed`; rank 0 of 1 when not started by torchrun.

    Raises:
        ValueError: The environment names a world but not this process's rank.
    """
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _CURRENT
    if _CURRENT.enabled:
        return _CURRENT
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"Expected RANK (and LOCAL_RANK) in the environment of a distributed run (WORLD_SIZE={world}), as "
            "torchrun sets them; start it with `torchrun --nproc-per-node N -m routerkit train CFG`."
        ) from err
    if device.startswith("mps"):
        raise ValueError("Expected run.device 'cpu' or 'cuda' for distributed training but got 'mps' (no backend for it).")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    _die_with_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _CURRENT = Distributed(rank, world, local, backend)
    return _CURRENT


def _die_with_launcher() -> None:
    """On Linux, have this rank terminated when its launcher (torchrun's agent) dies, however it dies.

    torchrun stops its ranks when it is interrupted or terminated, but a launcher killed outright
    would leave them training on, holding the run directory's lock.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the call (a launcher may itself be PID 1)
            os.kill(os.getpid(), signal.SIGTERM)


def teardown_distributed() -> None:
    """Leave the process group (after the last collective)."""
    global _CURRENT
    if _CURRENT.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Distributed()


def launch_command(nproc: int, argv: Iterator[str] | list[str]) -> list[str]:
    """The torchrun command that runs ``routerkit <argv>`` in ``nproc`` processes on this machine."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}"]
    return [*run, "-m", "routerkit", *argv]
