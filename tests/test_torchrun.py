"""``nnunetv2_fias.train``: one process (= nnUNetv2_train) and torchrun jobs of two "nodes" on this machine (two
torchrun agents, c10d rendezvous on 127.0.0.1, gloo on the CPU), for FIASTrainer and nnU-Net's own trainer; the rank
and device logic; FIASTrainer's atomic checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunet_env import (DATASET_ID, DATASET_NAME, PACKAGE_SHIM_DIR, nnunet_env,
                        tiny_fias_overrides)

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
TRAINER_SHIM = "fias_torchrun_test_trainers"

# Test-only trainers (nnU-Net finds them through nnUNet_extTrainer): 2 iterations per epoch, a checkpoint every epoch,
# TR_EPOCHS epochs. Each rank reports its parameters after the last step into TR_REPORT; TR_STALL_RANK stops at the
# start of epoch TR_STALL_EPOCH (so that the test can kill it at a known point) and says on which node (TR_NODE) and
# in which process.
_SHIM_SOURCE = '''\
import hashlib, json, os, time

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_fias.trainers import FIASTrainer


class _Probe:
    def _tiny(self):
        self.num_epochs = int(os.environ.get("TR_EPOCHS", "1"))
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def _rank(self):
        return dist.get_rank() if dist.is_initialized() else 0

    def on_train_epoch_start(self):
        if (self._rank() == int(os.environ.get("TR_STALL_RANK", "-1"))
                and self.current_epoch == int(os.environ.get("TR_STALL_EPOCH", "-1"))):
            with open(os.path.join(os.environ["TR_REPORT"], "stalled"), "w") as f:
                f.write(f"{os.environ['TR_NODE']} {os.getpid()}")
            time.sleep(180)  # the test kills it long before; bounded so that no stray worker outlives a failed test
        super().on_train_epoch_start()

    def on_train_end(self):
        net = self.network.module if self.is_ddp else self.network
        params = b"".join(p.detach().cpu().numpy().tobytes() for p in net.parameters())
        report = {"rank": self._rank(), "params_sha256": hashlib.sha256(params).hexdigest(),
                  "batch_size": self.batch_size, "global_batch_size": self.configuration_manager.batch_size,
                  "device": str(self.device), "is_ddp": self.is_ddp, "node": int(os.environ.get("TR_NODE", "0"))}
        with open(os.path.join(os.environ["TR_REPORT"], f"rank{self._rank()}.json"), "w") as f:
            json.dump(report, f)
        super().on_train_end()


class FIASTrainer_trTiny(_Probe, FIASTrainer):
    fias_overrides = {overrides}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()


class nnUNetTrainer_trTiny(_Probe, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._tiny()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tiny_dataset):
    return tiny_dataset


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun_shim")
    (folder / f"{TRAINER_SHIM}.py").write_text(_SHIM_SOURCE.replace("{overrides}", repr(tiny_fias_overrides())))
    return folder


def _env(root: Path, shim_dir: Path, results: Path, report: Path, **extra) -> dict:
    report.mkdir(parents=True, exist_ok=True)
    return nnunet_env(root, ext_dirs=[PACKAGE_SHIM_DIR, shim_dir], nnUNet_results=str(results),
                      TR_REPORT=str(report), OMP_NUM_THREADS="1", nnUNet_n_proc_DA="0", **extra)


def _start_node(node_rank: int, port: int, args: list, env: dict, log: Path, timeout_s: int = 60
                ) -> subprocess.Popen:
    """One "node": a torchrun agent with one worker, in its own process group (so the test can kill the node).

    With c10d the rendezvous, not --node-rank, decides which node gets rank 0 (the tests ask the ranks)."""
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           # node 0 hosts the rendezvous store, so that killing node 1 leaves node 0 a store to report to
           "--rdzv-conf", f"is_host={int(node_rank == 0)},join_timeout=120", "--max-restarts", "0",
           "-m", "nnunetv2_fias.train", str(DATASET_ID), "2d", "0", "-device", "cpu", "-dist_timeout", str(timeout_s),
           *map(str, args)]
    return subprocess.Popen(cmd, env={**env, "TR_NODE": str(node_rank)}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError("a node did not finish in time\n" + "\n".join(
            f"--- {log.name} ---\n{log.read_text()[-4000:]}" for log in logs)) from None
    finally:
        for p in procs:
            _stop(p)


def _stop(proc: subprocess.Popen) -> None:
    """Ends a node: SIGTERM lets the torchrun agent end its workers (they run in sessions of their own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _two_nodes(args: list, envs: list[dict], logs_dir: Path, timeout: float = 240) -> None:
    port = _free_port()
    logs = [logs_dir / f"node{r}.log" for r in range(2)]
    procs = [_start_node(r, port, args, envs[r], logs[r]) for r in range(2)]
    codes = _wait(procs, logs, timeout)
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(
        f"--- {log.name} ---\n{log.read_text()[-6000:]}" for log in logs)


def _fold(results: Path, trainer: str) -> Path:
    return results / DATASET_NAME / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _reports(report: Path) -> list[dict]:
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------------- two torchrun nodes
def test_two_nodes_nnunet_trainer(root, shim_dir, tmp_path):
    """nnU-Net's own trainer across two nodes that share no results folder: both finish with identical parameters,
    the plans' batch 2 is split 1 + 1, and rank 0 alone writes the fold folder (log, checkpoints, validation)."""
    trainer = "nnUNetTrainer_trTiny"
    results = [tmp_path / "results_node0", tmp_path / "results_node1"]
    envs = [_env(root, shim_dir, results[r], tmp_path / "report") for r in range(2)]
    _two_nodes(["-tr", trainer], envs, tmp_path)
    ranks = _reports(tmp_path / "report")
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert [r["batch_size"] for r in ranks] == [1, 1] and all(r["is_ddp"] for r in ranks)
    assert all(r["device"] == "cpu" for r in ranks)
    written = _files(_fold(results[ranks[0]["node"]], trainer))
    assert "checkpoint_final.pth" in written and "validation/summary.json" in written
    assert any(name.startswith("training_log_") for name in written)
    assert _files(_fold(results[ranks[1]["node"]], trainer)) == {}


def test_two_nodes_fias_lost_node_then_resume(root, shim_dir, tmp_path):
    """FIASTrainer across two nodes: the node running rank 1 (its training process and torchrun agent) is SIGKILLed
    in epoch 1 (after epoch 0's checkpoint_latest.pth); the other exits with a clear error, at the latest when its
    collective timeout (-dist_timeout 20) has passed, instead of hanging. ``--c`` then resumes both nodes from that checkpoint, each node reading its own copy
    of the fold folder (as on a shared file system): the rank that is not rank 0 writes nothing into it, the CAF
    history and the warm-up/poly schedule go on where they stopped, and the ranks end with identical parameters."""
    trainer = "FIASTrainer_trTiny"
    results = tmp_path / "results"
    envs = [_env(root, shim_dir, results, tmp_path / "report1", TR_EPOCHS="2", TR_STALL_RANK="1",
                 TR_STALL_EPOCH="1") for _ in range(2)]
    port = _free_port()
    logs = [tmp_path / f"node{r}_killed.log" for r in range(2)]
    procs = [_start_node(r, port, ["-tr", trainer], envs[r], logs[r], timeout_s=20) for r in range(2)]
    stalled = tmp_path / "report1" / "stalled"
    try:
        deadline = time.monotonic() + 200
        while not (stalled.exists() and len(stalled.read_text().split()) == 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "\n".join(
                log.read_text()[-4000:] for log in logs)
            time.sleep(0.5)
        lost, worker = map(int, stalled.read_text().split())  # the node where rank 1 runs, and its process
        survivor = 1 - lost
        os.kill(worker, signal.SIGKILL)  # the whole node dies: its training process and its torchrun agent
        os.killpg(procs[lost].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[survivor].wait(timeout=90)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            _stop(p)
        if stalled.exists() and len(stalled.read_text().split()) == 2:  # on any failure, the stalled worker too
            with contextlib.suppress(OSError):
                os.kill(int(stalled.read_text().split()[1]), signal.SIGKILL)
    log = logs[survivor].read_text()
    assert code != 0 and waited < 20 + 30, (code, waited, log[-6000:])
    assert "rank 0 of 2 lost contact with the other processes of this job" in log, log[-6000:]
    fold = _fold(results, trainer)
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and not (fold / "checkpoint_final.pth").exists()
    caf_before = json.loads((fold / "caf_balance.json").read_text())
    assert caf_before["epochs"] == [0]

    # Resume. Node 1 gets its own copy of the results (what a shared file system shows it); the rank that is not
    # rank 0 must write nothing into its copy.
    copies = [results, tmp_path / "results_copy"]
    shutil.copytree(results, copies[1])
    before = [_files(_fold(c, trainer)) for c in copies]
    envs = [_env(root, shim_dir, copies[r], tmp_path / "report2", TR_EPOCHS="2") for r in range(2)]
    _two_nodes(["-tr", trainer, "--c"], envs, tmp_path)
    ranks = _reports(tmp_path / "report2")
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert [r["batch_size"] for r in ranks] == [1, 1] and {r["global_batch_size"] for r in ranks} == {2}
    other = ranks[1]["node"]
    assert _files(_fold(copies[other], trainer)) == before[other]
    fold = _fold(copies[ranks[0]["node"]], trainer)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and not (fold / "checkpoint_latest.pth").exists()
    caf = json.loads((fold / "caf_balance.json").read_text())
    assert caf["epochs"] == [0, 1] and caf["global_weight"][0] == caf_before["global_weight"][0]
    # FIASTrainer's schedule at 2 epochs: 1 warm-up epoch at half the rate, then poly decay from the full rate.
    from nnunetv2_fias.trainers import WarmupPolyLRScheduler
    schedule = WarmupPolyLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 3e-4, 2, 1)
    assert final["logging"]["lrs"] == pytest.approx([schedule.lr_at(0), schedule.lr_at(1)])
    assert (fold / "validation" / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------- unit tests
def test_torchrun_env_reads_torchrun_variables():
    from nnunetv2_fias.distributed import TorchrunEnv, torchrun_env

    assert torchrun_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert torchrun_env(env) == TorchrunEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 must lie in [0, WORLD_SIZE=2)"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 must lie in"),
])
def test_torchrun_env_rejects_inconsistent_variables(env, expected):
    from nnunetv2_fias.distributed import DistributedSetupError, torchrun_env

    with pytest.raises(DistributedSetupError, match=expected.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        torchrun_env(env)


def test_rank_device_uses_local_rank_not_global_rank(monkeypatch):
    from nnunetv2_fias.distributed import DistributedSetupError, TorchrunEnv, rank_device

    second_node = TorchrunEnv(rank=9, world_size=16, local_rank=1, local_world_size=8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert rank_device("cuda", second_node) == torch.device("cuda", 1)
    assert rank_device("cpu", second_node) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK 1 needs GPU index 1, but this node has 1 visible"):
        rank_device("cuda", second_node)
    with pytest.raises(DistributedSetupError, match="-device mps"):
        rank_device("mps", second_node)


def test_global_batch_must_cover_every_rank():
    from nnunetv2_fias.distributed import DistributedSetupError, check_global_batch

    check_global_batch(2, 2, "2d", "nnUNetPlans")
    with pytest.raises(DistributedSetupError, match="batch size of 2, smaller than the 4 processes"):
        check_global_batch(2, 4, "2d", "nnUNetPlans")


@pytest.mark.parametrize("argv, expected", [
    (["1", "2d", "0", "--c", "--val"], "--c continues a training and --val"),
    (["1", "2d", "0", "--c", "-pretrained_weights", "w.pth"], "-pretrained_weights initialises"),
    (["1", "2d", "x"], "fold must be an integer"),
    (["1", "2d", "0", "-device", "tpu"], "invalid choice: 'tpu'"),
])
def test_command_line_errors_name_the_argument(argv, expected, capsys):
    from nnunetv2_fias.cli import main

    assert main(["train", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_num_gpus_under_torchrun_is_refused(monkeypatch, capsys):
    from nnunetv2_fias import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.main(["1", "2d", "0", "-num_gpus", "2", "-device", "cpu"]) == 1
    assert "set torchrun --nproc-per-node instead" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- atomic checkpoints
def test_fias_checkpoint_survives_a_failure_during_the_save(root, tmp_path, monkeypatch):
    """A save that dies half-way (here: an interrupt after half the bytes) leaves the previous checkpoint loadable
    and no partial file behind; nnU-Net's own in-place save would leave a truncated file."""
    from nnunet_env import make_trainer
    from nnunetv2_fias.trainers import FIASTrainer

    tiny = type("FIASTrainer_atomicTiny", (FIASTrainer,), {"fias_overrides": tiny_fias_overrides()})
    trainer = make_trainer(tiny, root, results=tmp_path / "results")
    trainer.initialize()
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.current_epoch = 3
    trainer.save_checkpoint(str(path))
    assert torch.load(path, map_location="cpu", weights_only=False)["current_epoch"] == 4

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # what a signal during the write looks like to the caller

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.current_epoch = 7
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, map_location="cpu", weights_only=False)["current_epoch"] == 4
    assert sorted(p.name for p in path.parent.glob("checkpoint_latest*")) == ["checkpoint_latest.pth"]

    trainer.save_checkpoint(str(path))  # the next save goes through
    assert torch.load(path, map_location="cpu", weights_only=False)["current_epoch"] == 8


# --------------------------------------------------------------------------------------------------- one process
def test_one_process_matches_nnunetv2_train(root, shim_dir, tmp_path):
    """Outside torchrun, ``nnunetv2_fias train`` is nnUNetv2_train: the same fold folder from the same arguments."""
    trainer = "FIASTrainer_trTiny"
    layouts = []
    for name, command in (("ours", [str(BIN / "nnunetv2_fias"), "train"]), ("nnunet", [str(BIN / "nnUNetv2_train")])):
        results = tmp_path / name
        env = _env(root, shim_dir, results, tmp_path / f"report_{name}")
        proc = subprocess.run([*command, str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu", "--npz"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        report = json.loads((tmp_path / f"report_{name}" / "rank0.json").read_text())
        assert not report["is_ddp"] and report["batch_size"] == 2
        fold = _fold(results, trainer)
        layouts.append(sorted("training_log_*.txt" if f.startswith("training_log_") else f for f in _files(fold)))
    assert layouts[0] == layouts[1]
    assert {"checkpoint_final.pth", "caf_balance.json", "validation/summary.json",
            "validation/case_000.npz"} <= set(layouts[0])


def test_lost_peer_errors_are_told_from_other_errors():
    import torch.distributed as dist
    from nnunetv2_fias.distributed import is_communication_error

    gloo_timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out "
                                "waiting 20000ms for send operation to complete")
    assert is_communication_error(gloo_timeout)
    assert is_communication_error(RuntimeError("Connection closed by peer [127.0.0.1]:41234"))
    assert is_communication_error(dist.DistBackendError("NCCL communicator was aborted"))
    assert not is_communication_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_communication_error(ValueError("patch size"))


def test_process_group_is_left_on_error_and_ddp_patch_is_scoped(monkeypatch):
    """One gloo rank: nnU-Net's DDP call (device_ids=[global rank]) works on the CPU inside the context, BatchNorm is
    not converted to the GPU-only SyncBatchNorm, and everything is restored and the group left, also on error."""
    import importlib

    import torch.distributed as dist
    from torch import nn
    from nnunetv2_fias.distributed import ddp_on_rank_device, process_group

    trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    original_ddp = trainer_module.DDP
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    cpu = torch.device("cpu")
    with pytest.raises(KeyError):
        with process_group(cpu, timeout_s=30):
            with ddp_on_rank_device(cpu):
                net = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
                wrapped = trainer_module.DDP(net, device_ids=[3])  # what nnU-Net calls on global rank 3
            assert isinstance(wrapped.module[1], nn.BatchNorm2d) and wrapped.device_ids is None
            wrapped(torch.randn(2, 1, 8, 8)).sum().backward()
            raise KeyError("a failure inside the training")
    assert not dist.is_initialized()
    assert trainer_module.DDP is original_ddp
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))
    assert isinstance(converted[0], nn.SyncBatchNorm)


@pytest.mark.parametrize("device, expected", [("cpu", "PASSIVE"), ("cuda", None)])
def test_train_sets_a_passive_openmp_wait_policy_on_the_cpu_before_torch_loads(monkeypatch, device, expected):
    from nnunetv2_fias import distributed, train

    class Reached(Exception):
        pass

    def stop():
        raise Reached(os.environ.get("OMP_WAIT_POLICY"))

    monkeypatch.setenv("OMP_WAIT_POLICY", "placeholder")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(distributed, "torchrun_env", stop)
    with pytest.raises(Reached) as seen:
        train.main(["987", "2d", "0", "-device", device])
    assert seen.value.args[0] == expected
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice stays
    with pytest.raises(Reached) as seen:
        train.main(["987", "2d", "0", "-device", device])
    assert seen.value.args[0] == "ACTIVE"
