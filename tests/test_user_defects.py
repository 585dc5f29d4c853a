"""What a new user hit (issue 21): staging folders left by killed conversions, dataset folders only their owner can
read, late and misleading failures (benchmark patches, pretrained files, doctor's fixes) and an unreadable CAF
plot. Each test reproduces the user's situation."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fake_trees as ft
from nnunet_env import PACKAGE_SHIM_DIR, REPO_ROOT
from nnunetv2_fias import _util, doctor
from nnunetv2_fias.dataset_conversion.synapse import main as convert_synapse_main

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------- staging folders (1, 2)
@pytest.fixture(scope="module")
def synapse_tree(tmp_path_factory) -> Path:
    return ft.make_synapse_raw(tmp_path_factory.mktemp("synapse_src"), test_folder="Test")


@pytest.fixture(scope="module")
def acdc_tree(tmp_path_factory) -> Path:
    return ft.make_acdc_release(tmp_path_factory.mktemp("acdc_src"))


def _killed_conversion(base: Path, tree: Path, dataset_id: int, converter: str = "synapse") -> None:
    """A converter SIGKILLed after every case was written (its staging folder is complete but unused)."""
    script = textwrap.dedent(f"""
        import os, signal
        from nnunetv2_fias.dataset_conversion import runner
        from nnunetv2_fias.dataset_conversion.{converter} import main
        runner.drop_empty_folders = lambda staging: os.kill(os.getpid(), signal.SIGKILL)
        main(["-i", {str(tree)!r}, "-d", "{dataset_id}", "-np", "1"])
    """)
    env = dict(os.environ, nnUNet_raw=str(base / "nnUNet_raw"), nnUNet_preprocessed=str(base / "nnUNet_preprocessed"),
               nnUNet_results=str(base / "nnUNet_results"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _staging(raw: Path) -> list[Path]:
    return sorted(p for p in raw.iterdir() if ".partial-" in p.name)


def test_killed_conversion_leaves_staging_that_the_next_run_and_doctor_handle(synapse_tree, tmp_path, monkeypatch,
                                                                            capsys):
    with ft.nnunet_env(tmp_path):
        raw = tmp_path / "nnUNet_raw"
        _killed_conversion(tmp_path, synapse_tree, 111)
        (left,) = _staging(raw)
        assert left.name.startswith(".Dataset111_Synapse.partial-") and (left / "imagesTr").is_dir()

        # doctor names the leftover (and only it) with the command that removes it.
        monkeypatch.setenv("nnUNet_extTrainer", str(PACKAGE_SHIM_DIR))
        findings = [f for f in doctor.run_checks().findings if "staging" in f.text]
        assert len(findings) == 1 and findings[0].level == "warn" and str(left) in findings[0].fix

        assert convert_synapse_main(["-i", str(synapse_tree), "-d", "111", "-np", "1"]) == 0
        assert "removed a staging folder" in capsys.readouterr().err
        assert _staging(raw) == [] and ft.names(raw) == {"Dataset111_Synapse"}
        assert not any(f.name == _util.STAGING_OWNER for f in (raw / "Dataset111_Synapse").rglob("*"))
        assert not [f for f in doctor.run_checks().findings if "staging" in f.text]


def test_killed_acdc_conversion_is_cleaned_by_the_next_run(acdc_tree, tmp_path, capsys):
    from nnunetv2_fias.dataset_conversion.acdc import main as convert_acdc_main

    with ft.nnunet_env(tmp_path):
        raw = tmp_path / "nnUNet_raw"
        _killed_conversion(tmp_path, acdc_tree, 27, converter="acdc")
        (left,) = _staging(raw)
        assert convert_acdc_main(["-i", str(acdc_tree), "-d", "27", "-np", "1"]) == 0
        assert str(left) in capsys.readouterr().err
        assert _staging(raw) == [] and ft.names(raw) == {"Dataset027_ACDC"}


def test_converted_dataset_is_readable_by_others_under_umask_022(synapse_tree, tmp_path):
    old = os.umask(0o022)
    try:
        with ft.nnunet_env(tmp_path):
            assert convert_synapse_main(["-i", str(synapse_tree), "-d", "112", "-np", "1"]) == 0
    finally:
        os.umask(old)
    dataset = tmp_path / "nnUNet_raw" / "Dataset112_Synapse"
    assert stat.S_IMODE(dataset.stat().st_mode) == 0o755
    assert stat.S_IMODE((dataset / "imagesTr").stat().st_mode) == 0o755
    split = tmp_path / "nnUNet_preprocessed" / "Dataset112_Synapse" / "splits_final.json"
    assert stat.S_IMODE(split.stat().st_mode) == 0o644


def _hold_staging(final: Path) -> subprocess.Popen:
    """Another process writing a staging folder for ``final`` (it prints the folder, then sleeps)."""
    code = (f"import sys, time; from nnunetv2_fias._util import StagingFolder; s = StagingFolder({str(final)!r}); "
            "print(s.path, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the holder did not start"
    return proc


def test_stale_staging_removal_spares_live_young_and_foreign_folders(tmp_path):
    final = tmp_path / "Dataset111_Synapse"
    holder = _hold_staging(final)
    try:
        (live,) = _staging(tmp_path)
        dead_proc = _hold_staging(final)
        dead = next(p for p in _staging(tmp_path) if p != live)
        dead_proc.kill()
        dead_proc.wait()
        unowned_young = tmp_path / ".Dataset111_Synapse.partial-young123"  # an older version's folder, recent
        unowned_old = tmp_path / ".Dataset111_Synapse.partial-old12345"  # ... and one untouched for two hours
        replaced_old = tmp_path / ".Dataset111_Synapse.replaced-0a1b2c3d"
        spared = [tmp_path / ".Dataset111_Synapse.partial-toolong123",  # not the converter's pattern
                  tmp_path / ".Dataset112_Synapse.partial-abcdefgh",  # another dataset
                  tmp_path / "Dataset111_Synapse.partial-abcdefgh",  # not hidden
                  tmp_path / ".Dataset111_Synapse_v2.partial-abcdefgh"]
        for p in [unowned_young, unowned_old, replaced_old, *spared]:
            (p / "imagesTr").mkdir(parents=True)
            (p / "imagesTr" / "case_0000.nii.gz").write_bytes(b"x" * 1000)
        two_hours_ago = time.time() - 7200
        for p in (unowned_old, replaced_old):
            for q in (p / "imagesTr" / "case_0000.nii.gz", p / "imagesTr", p):
                os.utime(q, (two_hours_ago, two_hours_ago))
        later = time.time() + 7200  # ctime cannot be set back: judge the unowned ones from two hours ahead
        found = {s.path for s in _util.find_stale_staging(tmp_path, final.name, now=later)}
        assert found == {dead, unowned_young, unowned_old, replaced_old}
        found = {s.path for s in _util.find_stale_staging(tmp_path, final.name)}
        assert dead in found and live not in found and unowned_young not in found

        removed = {s.path for s in _util.remove_stale_staging(tmp_path, final.name)}
        assert dead in removed and not dead.exists()
        assert live.is_dir() and unowned_young.is_dir() and all(p.is_dir() for p in spared)
        # The holder's lock survives another process's probe: still not stale.
        assert live not in {s.path for s in _util.find_stale_staging(tmp_path, final.name, now=later)}
    finally:
        holder.kill()
        holder.wait()
    assert live in {s.path for s in _util.find_stale_staging(tmp_path, final.name)}


def test_staged_directory_restores_the_mode_and_removes_what_a_killed_run_left(tmp_path, capsys):
    final = tmp_path / "out"
    proc = _hold_staging(final)
    proc.kill()
    proc.wait()
    (left,) = _staging(tmp_path)
    old = os.umask(0o022)
    try:
        with _util.staged_directory(final) as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert not left.exists() and "removed a staging folder" in capsys.readouterr().err
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o755


# ---------------------------------------------------------------------------------------------------- doctor (7)
def _doctor_env(monkeypatch, tmp_path) -> None:
    for var in doctor.NNUNET_PATH_VARS:
        (tmp_path / var).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_extTrainer", str(PACKAGE_SHIM_DIR))
    monkeypatch.setenv("nnUNet_compile", "f")


def test_doctor_on_a_results_variable_that_names_a_file(monkeypatch, tmp_path):
    _doctor_env(monkeypatch, tmp_path)
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    monkeypatch.setenv("nnUNet_results", str(afile))
    (finding,) = [f for f in doctor.run_checks().findings if "nnUNet_results" in f.text]
    assert finding.level == "fail" and "is a file" in finding.text
    assert "mkdir" not in finding.fix and "export nnUNet_results=" in finding.fix
    assert afile.read_text() == "not a folder"


def test_doctor_on_ext_trainer_pointing_at_the_plugin_source_folder(monkeypatch, tmp_path):
    _doctor_env(monkeypatch, tmp_path)
    trainers_src = REPO_ROOT / "trainers"
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(trainers_src), str(PACKAGE_SHIM_DIR)]))
    findings = [f for f in doctor.run_checks().findings if f.level != "ok"]
    source = [f for f in findings if str(trainers_src) in f.text]
    assert len(source) == 1 and source[0].level == "fail"
    assert "nnunetv2_fias env" in source[0].fix and f"remove {trainers_src}" in source[0].fix
    assert not any(".py" in f.fix for f in findings)  # no "fix or remove .../trainers/budgets.py"


# -------------------------------------------------------------------------------------------- benchmark patches (3)
@pytest.mark.parametrize("patch", [["3", "3"], ["2", "2"], ["4", "4"], ["3", "4"], ["1", "3", "3"], ["1", "1"]])
def test_benchmark_patch_too_small_for_the_unet_is_one_message(patch, tmp_path, monkeypatch, capsys):
    from nnunetv2_fias import benchmark

    monkeypatch.setenv("nnUNet_compile", "f")
    out = tmp_path / "bench.json"
    assert benchmark.main(["--skip-timing", "--patch", *patch, "--json", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--patch {' '.join(patch)}" in err[0] and "--baselines none" in err[0]
    assert not out.exists()


def test_benchmark_small_patch_measures_fias_alone(tmp_path, monkeypatch):
    from nnunetv2_fias import benchmark

    monkeypatch.setenv("nnUNet_compile", "f")
    out = tmp_path / "bench.json"
    assert benchmark.main(["--skip-timing", "--patch", "3", "3", "--baselines", "none", "--json", str(out)]) == 0
    assert [r["model"] for r in json.loads(out.read_text())["results"]] == ["FIAS-T"]


# ------------------------------------------------------------------------------------------------- CAF plot (9)
def test_caf_plot_is_readable_after_nnunets_seaborn_style(tmp_path, monkeypatch):
    """nnU-Net's progress plot runs sns.set(font_scale=2.5) in the training process before the CAF plot is drawn."""
    import matplotlib
    import matplotlib.image
    import numpy as np
    import seaborn as sns
    from matplotlib.text import Text

    from nnunetv2_fias.trainers import caf_monitor

    drawn = []

    def capture(fig, path):  # the figure the trainer saves, as it was saved
        drawn.append(fig)
        return save(fig, path)

    save = caf_monitor.atomic_savefig
    monkeypatch.setattr(caf_monitor, "atomic_savefig", capture)
    epochs = list(range(40))
    weights = (0.5 + 0.1 * np.sin(np.arange(40)[:, None] / 6 + np.arange(4))).tolist()
    shares = (0.3 + 0.2 * np.random.default_rng(0).random((40, 4))).tolist()
    png = tmp_path / caf_monitor.CAF_PNG
    with matplotlib.rc_context():
        sns.set(font_scale=2.5)
        nnunet_font = matplotlib.rcParams["axes.labelsize"]
        caf_monitor.CAFMonitor._plot_caf(epochs, weights, shares, [[4, 4], [8, 8], [16, 16], [32, 32]], str(png))
        assert matplotlib.rcParams["axes.labelsize"] == nnunet_font  # the process's own style is left alone
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    assert texts and max(t.get_fontsize() for t in texts) <= 12
    drawn_area = fig.get_tightbbox(renderer)  # inches, what is drawn: nothing is cut off at the edges
    width, height = fig.get_size_inches()
    assert drawn_area.x0 >= -0.01 and drawn_area.y0 >= -0.01
    assert drawn_area.x1 <= width + 0.01 and drawn_area.y1 <= height + 0.01
    plot_areas = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [lg.get_window_extent(renderer) for lg in fig.legends] + \
        [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
    assert legends
    for lg in legends:  # the legend covers no curve
        for area in plot_areas:
            assert not lg.overlaps(area)
    labels = [ax.yaxis.label.get_window_extent(renderer) for ax in fig.axes]
    for label, other in zip(labels, plot_areas[::-1]):  # the y labels stay beside their own panel
        assert not label.overlaps(other)
    assert matplotlib.image.imread(png).shape[:2] == (450, 1100)
