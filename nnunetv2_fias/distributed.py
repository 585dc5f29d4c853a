"""Running an nnU-Net trainer as one rank of a ``torchrun`` job (one or several nodes).

nnU-Net 2.8's DDP assumes ``mp.spawn`` on one machine: ``nnUNetTrainer.__init__`` takes ``cuda:{global rank}`` as its
device, ``initialize()`` wraps the network in ``DDP(device_ids=[global rank])`` and always converts BatchNorm to
SyncBatchNorm (CUDA only). Everything here fixes that from outside the trainer class, so it works for any trainer
that keeps nnU-Net's ``initialize()``; ``trainer.local_rank`` stays the *global* rank, which is what nnU-Net's
"rank 0 alone writes" checks need.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Mapping, NamedTuple

import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """A torchrun job that cannot start as configured; the message says what to change."""


class TorchrunEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def torchrun_env(environ: Mapping[str, str] = os.environ) -> TorchrunEnv | None:
    """The rank layout torchrun (or ``srun torchrun``) exported, or None outside torchrun."""
    present = [v for v in _TORCHRUN_VARS if v in environ]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in environ]
        raise DistributedSetupError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: start distributed training with torchrun "
            f"(which sets RANK, WORLD_SIZE and LOCAL_RANK), or unset these variables for a one-process training.")
    values = {}
    for name in (*_TORCHRUN_VARS, "LOCAL_WORLD_SIZE"):
        raw = environ.get(name)
        if raw is None:  # LOCAL_WORLD_SIZE: torchrun always sets it; without it assume one process per node
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise DistributedSetupError(f"{name}={raw!r} is not an integer (torchrun sets it)") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    local_world = values.get("LOCAL_WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    if not 0 <= local < max(local_world, 1) or local > rank:
        raise DistributedSetupError(f"LOCAL_RANK={local} must lie in [0, LOCAL_WORLD_SIZE={local_world}) and not "
                                    f"exceed RANK={rank}")
    return TorchrunEnv(rank, world, local, local_world)


def rank_device(device_type: str, env: TorchrunEnv) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (the GPU index on this node, not the global rank) or the CPU."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise DistributedSetupError(
                f"-device cuda: LOCAL_RANK {env.local_rank} needs GPU index {env.local_rank}, but this node has "
                f"{visible} visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start at most {visible} process(es) per node (torchrun --nproc-per-node), or -device cpu.")
        return torch.device("cuda", env.local_rank)
    raise DistributedSetupError(f"-device {device_type}: distributed training runs on 'cuda' (NCCL) or 'cpu' "
                                f"(gloo); {device_type} has no multi-process backend in torch.")


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[None]:
    """Joins the torchrun job's process group (``env://``: NCCL on CUDA, gloo on the CPU) and always leaves it.

    ``timeout_s`` bounds every collective: a rank whose peer vanished without closing its connection (a node lost
    from the network) fails after that long instead of waiting forever.
    """
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds NCCL's communicator to this GPU now, not lazily on rank-dependent GPUs
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def place_trainer(trainer, device: torch.device) -> None:
    """Moves a trainer constructed inside the process group to this rank's device before ``initialize()``.

    nnU-Net's constructor set ``cuda:{global rank}`` (and a CUDA GradScaler) whenever a process group exists.
    """
    trainer.device = device
    if device.type != "cuda":
        trainer.grad_scaler = None  # nnU-Net scales gradients on CUDA only


@contextlib.contextmanager
def ddp_on_rank_device(device: torch.device) -> Iterator[None]:
    """While active, nnU-Net's ``initialize()`` wraps the network in DDP on this rank's device.

    nnU-Net calls ``DDP(network, device_ids=[global rank])``: on a second node that names a GPU the node may not
    have, and on the CPU DDP requires ``device_ids=None``. nnU-Net also converts BatchNorm to SyncBatchNorm, which
    torch implements for GPUs only; on the CPU (tests, debugging) each rank keeps its own BatchNorm statistics.
    """
    import importlib

    trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")

    original_ddp = trainer_module.DDP
    rank_ids = [device.index] if device.type == "cuda" else None

    def ddp(module, device_ids=None, **kwargs):  # nnU-Net passes device_ids=[global rank]
        return original_ddp(module, device_ids=rank_ids, **kwargs)

    sync_bn = torch.nn.SyncBatchNorm
    convert = vars(sync_bn)["convert_sync_batchnorm"]  # the classmethod object itself, to restore it unchanged
    trainer_module.DDP = ddp
    if device.type != "cuda":
        sync_bn.convert_sync_batchnorm = classmethod(lambda cls, module, process_group=None: module)
    try:
        yield
    finally:
        trainer_module.DDP = original_ddp
        sync_bn.convert_sync_batchnorm = convert


def check_global_batch(batch_size: int, world_size: int, configuration: str, plans_identifier: str) -> None:
    """nnU-Net splits the plans' batch over the ranks (``_set_batch_size_and_oversample``): each needs a sample."""
    if batch_size < world_size:
        raise DistributedSetupError(
            f"the plans '{plans_identifier}' give configuration '{configuration}' a batch size of {batch_size}, "
            f"smaller than the {world_size} processes of this job: nnU-Net splits that batch over the processes, "
            f"so start at most {batch_size} (torchrun --nnodes x --nproc-per-node), or train with plans whose "
            f"batch size is at least {world_size}.")


def check_same_epoch(epoch: int, checkpoint_hint: str) -> None:
    """Every rank must resume from the same epoch; a rank that found no checkpoint would start over and the ranks'
    collectives would no longer match (a hang). Collective: call it on every rank."""
    epochs: list = [None] * dist.get_world_size()
    dist.all_gather_object(epochs, int(epoch))
    if len(set(epochs)) > 1:
        per_rank = ", ".join(f"rank {r}: epoch {e}" for r, e in enumerate(epochs))
        raise DistributedSetupError(
            f"the processes would start from different epochs ({per_rank}): every node must read the same "
            f"checkpoint ({checkpoint_hint}); put nnUNet_results on a file system all nodes share.")


def unwrap_for_single_rank(trainer) -> None:
    """Turns a DDP-trained trainer into a one-process one (rank 0's final validation, while the others exit).

    Only the DDP wrapper goes: in eval mode SyncBatchNorm uses its running statistics and never communicates.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(trainer.network, DDP):
        trainer.network = trainer.network.module
    trainer.is_ddp = False


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that another rank (or the network between them) failed."""
    errors = tuple(e for e in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                               getattr(dist, "DistNetworkError", None)) if e is not None)
    if isinstance(exc, errors):
        return True
    # gloo reports a lost peer or a timed-out collective as a plain RuntimeError naming its transport
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text.lower() or "by peer" in text)
