"""``nnUNetv2_train`` that also runs as a ``torchrun`` job spanning several nodes, for any nnU-Net trainer.

    python -m nnunetv2_fias.train DATASET CONFIGURATION FOLD [-tr TRAINER] [-p PLANS] [--c] [--val] [--npz] ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m nnunetv2_fias.train DATASET CONFIGURATION FOLD -tr FIASTrainer

Outside torchrun this is ``nnUNetv2_train`` itself (nnU-Net's ``run_training``, ``-num_gpus`` included). Under torchrun
(RANK, WORLD_SIZE, LOCAL_RANK set) every process is one rank: it joins the job's process group from the environment
(NCCL on CUDA, gloo on the CPU), trains on GPU ``LOCAL_RANK`` of its node with the plans' batch split over all ranks,
and rank 0 alone writes the log, checkpoints and the final validation (nnUNet_results must be shared by the nodes to
resume with ``--c``). The process group is left at the end, also on error.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

PROG = "nnunetv2_fias train"
DEFAULT_DIST_TIMEOUT_S = 1800  # torch's default for gloo; long enough for rank 0's dataset unpacking at start


def build_parser() -> argparse.ArgumentParser:
    """nnUNetv2_train's arguments (same names, defaults and meaning), plus ``-dist_timeout``."""
    p = argparse.ArgumentParser(
        prog=PROG, description="nnUNetv2_train, also as one rank of a torchrun job (several GPUs or nodes): "
                               "torchrun [...] -m nnunetv2_fias.train DATASET CONFIGURATION FOLD [options].")
    p.add_argument("dataset_name_or_id", type=str, help="Dataset name or ID to train with")
    p.add_argument("configuration", type=str, help="Configuration that should be trained")
    p.add_argument("fold", type=str, help="Fold of the 5-fold cross-validation (0-4) or 'all'")
    p.add_argument("-tr", type=str, default="nnUNetTrainer", help="Trainer class. Default: nnUNetTrainer")
    p.add_argument("-p", type=str, default="nnUNetPlans", help="Plans identifier. Default: nnUNetPlans")
    p.add_argument("-pretrained_weights", type=str, default=None,
                   help="nnU-Net checkpoint whose weights initialise the network (new trainings only)")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="nnU-Net's one-machine multi-GPU training (mp.spawn). Not under torchrun, where "
                        "--nproc-per-node sets the processes per node")
    p.add_argument("--npz", action="store_true", help="Save the final validation's softmax outputs (for ensembling)")
    p.add_argument("--c", action="store_true",
                   help="Continue from checkpoint_final/latest/best.pth of the fold (starts anew if none exists)")
    p.add_argument("--val", action="store_true", help="Only run the final validation (training must be finished)")
    p.add_argument("--val_best", action="store_true", help="Validate with checkpoint_best.pth, not checkpoint_final")
    p.add_argument("--disable_checkpointing", action="store_true", help="Write no checkpoints")
    p.add_argument("-device", type=str, default="cuda", choices=("cuda", "cpu", "mps"),
                   help="cuda (default), cpu or mps. Pick GPUs with CUDA_VISIBLE_DEVICES; under torchrun each "
                        "process uses GPU LOCAL_RANK of those")
    p.add_argument("-dist_timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                   help=f"Under torchrun: how long a process waits for the others in one collective before it "
                        f"fails (a lost node). Default: {DEFAULT_DIST_TIMEOUT_S}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.c and args.val:
        parser.error("--c continues a training and --val only validates a finished one: give one of them")
    if args.c and args.pretrained_weights is not None:
        parser.error("-pretrained_weights initialises a new training; --c continues from the fold's checkpoint: "
                     "give one of them")
    if args.val_best and args.disable_checkpointing:
        parser.error("--val_best validates with checkpoint_best.pth, which --disable_checkpointing never writes")
    if args.fold != "all":
        try:
            int(args.fold)
        except ValueError:
            parser.error(f"fold must be an integer (0-4 for nnU-Net's 5-fold split) or 'all', got {args.fold!r}")
    if args.num_gpus < 1:
        parser.error(f"-num_gpus must be at least 1, got {args.num_gpus}")
    if not args.dist_timeout > 0:
        parser.error(f"-dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    return args


def _set_threads(device_type: str, processes_per_node: int) -> None:
    """nnU-Net's thread settings (``run_training_entry``), the CPU shared among the processes of one node."""
    import torch

    if device_type == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // max(1, processes_per_node)))
    elif device_type == "cuda":  # multithreading in torch does not help nnU-Net on a GPU
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def _fold(fold: str) -> int | str:
    return fold if fold == "all" else int(fold)


def train_one_process(args: argparse.Namespace) -> None:
    """Exactly ``nnUNetv2_train`` (nnU-Net's ``run_training``)."""
    import torch
    from nnunetv2.run.run_training import run_training

    _set_threads(args.device, 1)
    run_training(args.dataset_name_or_id, args.configuration, _fold(args.fold), args.tr, args.p,
                 args.pretrained_weights, args.num_gpus, args.npz, args.c, args.val, args.disable_checkpointing,
                 args.val_best, device=torch.device(args.device))


def train_distributed(args: argparse.Namespace, env) -> None:
    """This process's part of a torchrun job; see the module docstring."""
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    import torch
    from torch.backends import cudnn

    from nnunetv2_fias.distributed import (DistributedSetupError, check_global_batch, check_same_epoch,
                                           ddp_on_rank_device, is_communication_error, place_trainer,
                                           process_group, rank_device, unwrap_for_single_rank)

    if args.num_gpus != 1:
        raise DistributedSetupError(
            f"-num_gpus {args.num_gpus} starts processes itself (nnU-Net's mp.spawn); under torchrun every process "
            f"is already one rank: leave -num_gpus out and set torchrun --nproc-per-node instead")
    device = rank_device(args.device, env)
    _set_threads(device.type, env.local_world_size)
    with process_group(device, args.dist_timeout):
        try:
            trainer = get_trainer_from_args(args.dataset_name_or_id, args.configuration, _fold(args.fold), args.tr,
                                            args.p, args.c, device=device)
            place_trainer(trainer, device)
            if args.disable_checkpointing:
                trainer.disable_checkpointing = True
            check_global_batch(trainer.configuration_manager.batch_size, env.world_size, args.configuration, args.p)
            with ddp_on_rank_device(device):
                trainer.initialize()
            maybe_load_checkpoint(trainer, args.c, False, args.pretrained_weights)
            check_same_epoch(trainer.current_epoch, join(trainer.output_folder, "checkpoint_*.pth"))
            if torch.cuda.is_available():
                cudnn.deterministic = False
                cudnn.benchmark = True
            trainer.run_training()
        except Exception as e:
            if is_communication_error(e):
                raise LostPeerError(
                    f"rank {env.rank} of {env.world_size} lost contact with the other processes of this job "
                    f"({type(e).__name__}: {_first_line(e)}). "
                    f"Another process or node failed (see its own log) or the network did; waited at most "
                    f"{args.dist_timeout:g} s (-dist_timeout). Resume with the same command plus --c.") from e
            raise
        # The final validation runs on rank 0 alone, so that nothing but rank 0 writes into the fold folder and the
        # other nodes need no access to nnUNet_results; they are done.
        if env.rank == 0:
            unwrap_for_single_rank(trainer)
            if args.val_best:
                trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
            trainer.perform_actual_validation(args.npz)


def _first_line(e: BaseException) -> str:
    """The first line of a torch.distributed error, without the C++ source location gloo/NCCL put in front."""
    import re

    lines = str(e).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else "no details"


class LostPeerError(RuntimeError):
    """Another rank of the job (or the network) failed; this rank stops."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Before torch loads OpenMP (it reads the variable once): see nnunetv2_fias.doctor.OMP_WAIT_ADVICE.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nnunetv2_fias.distributed import DistributedSetupError, torchrun_env

    try:
        env = torchrun_env()
        if env is None or env.world_size == 1:
            train_one_process(args)
        elif args.val:
            # Validation needs one process: rank 0 runs it as nnUNetv2_train --val would, the others have nothing
            # to do (and no process group is needed).
            if env.rank == 0:
                train_one_process(args)
        else:
            train_distributed(args, env)
    except (DistributedSetupError, LostPeerError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
