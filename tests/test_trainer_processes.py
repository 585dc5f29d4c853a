"""FIASTrainer across processes: DistributedDataParallel (gloo, 2 CPU processes) and the spawn start method."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_env import DATASET_ID, DATASET_NAME, PACKAGE_SHIM_DIR, nnunet_env

TESTS_DIR = Path(__file__).resolve().parent

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_python(code: str, folder: Path, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    # A script file, not -c: spawned children re-import the main module.
    script = folder / "script.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
    return proc


# The DDP cases: (deep supervision, patch size, split the planned batch over the ranks as -num_gpus does).
DDP_CASES = {"DS": (True, None, False), "NoDS": (False, None, False), "batch1": (True, [32, 32], True)}


@pytest.fixture(scope="module")
def ddp_ranks(tiny_dataset, tmp_path_factory) -> dict[str, list[dict]]:
    """Each rank's report per case of :data:`DDP_CASES`: two training steps on 2 gloo processes, one process group
    per case; the cases share one pair of processes, which costs the start-up of torch and nnU-Net once."""
    work = tmp_path_factory.mktemp("ddp")
    cases = [(name, str(work / name), _free_port(), *case) for name, case in DDP_CASES.items()]
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch.multiprocessing as mp, nnunet_env\n"
        "if __name__ == '__main__':\n"
        "    mp.spawn(nnunet_env.ddp_cases, args=(2, %r, %r, %r), nprocs=2, join=True)\n"
        % (str(TESTS_DIR), str(tiny_dataset), str(work / "results"), cases))
    _run_python(code, work, nnunet_env(tiny_dataset, nnUNet_results=str(work / "results")))
    return {name: [json.loads((work / name / f"rank{r}.json").read_text()) for r in range(2)] for name in DDP_CASES}


@pytest.mark.parametrize("case", ["DS", "NoDS"])
def test_ddp_training_step_without_find_unused_parameters(ddp_ranks, case):
    deep_supervision = DDP_CASES[case][0]
    for r in ddp_ranks[case]:
        assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])  # finite, two completed steps
        assert r["max_param_diff"] == 0.0
        if deep_supervision:
            assert r["n_outputs"] == 4
            assert len(r["weights"]) == 4 and min(r["weights"]) > 0  # every head gets a gradient
        else:
            assert r["n_outputs"] == 1


def test_ddp_batch_one_per_process_with_a_1x1_stage(ddp_ranks):
    """nnU-Net's -num_gpus 2 on a plan with batch 2 gives each process one sample; at a 32x32 patch FIAS's coarsest
    stage is 1x1, where plain BatchNorm has a single value per channel and cannot train."""
    for r in ddp_ranks["batch1"]:
        assert r["batch_size"] == 1
        assert len(r["losses"]) == 2 and all(math.isfinite(l) for l in r["losses"])
        assert r["max_param_diff"] == 0.0 and r["n_outputs"] == 4


def test_training_under_spawn_start_method(tiny_dataset, test_shim, tmp_path):
    """nnUNetv2_train's entry point with the spawn start method and a data-augmentation worker process, and the
    trainer class nnU-Net discovers through the shim survives pickling into a spawned process."""
    results = tmp_path / "results"
    env = nnunet_env(tiny_dataset, ext_dirs=[PACKAGE_SHIM_DIR, test_shim], nnUNet_results=str(results),
                     nnUNet_n_proc_DA="1", FIAS_TEST_EPOCHS="1")
    code = (
        "import multiprocessing as mp, pickle, sys\n"
        "def _roundtrip(cls):\n"
        "    return pickle.dumps(cls)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('spawn', force=True)\n"
        "    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
        "    import nnunetv2_fias.trainers as t\n"
        "    cls = recursive_find_trainer_class_by_name('FIASTrainer')\n"
        "    assert cls is t.FIASTrainer, cls\n"
        "    with mp.get_context('spawn').Pool(1) as pool:\n"
        "        assert pickle.loads(pool.apply(_roundtrip, (cls,))) is t.FIASTrainer\n"
        "    from nnunetv2.run.run_training import run_training_entry\n"
        "    sys.argv = ['nnUNetv2_train', '%d', '2d', '0', '-tr', 'FIASTrainer_e2eTiny', '-device', 'cpu']\n"
        "    run_training_entry()\n" % DATASET_ID)
    _run_python(code, tmp_path, env)
    fold = results / DATASET_NAME / "FIASTrainer_e2eTiny__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()
    assert json.loads((fold / "caf_balance.json").read_text())["epochs"] == [0]
