"""The CAF balance of a FIAS training: per epoch and stage, the weight each Context-Aware Fusion gives the global
(DilateFormer) branch and that branch's effective share of the fused feature, logged, stored in
``caf_balance.json`` and plotted in ``caf_balance.png`` (it makes the paper's "feature balance" observable)."""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np

from nnunetv2_fias._util import atomic_savefig, atomic_write_json

CAF_JSON = "caf_balance.json"
CAF_PNG = "caf_balance.png"


class CAFMonitor:
    """Mixin for FIASTrainer: collects the per-iteration values (``_caf_epoch_values``, ``_caf_share_values``, filled
    by ``train_step``) and keeps the history across ``--c``."""

    def _record_caf_epoch(self) -> None:
        if not self._caf_epoch_values:
            return
        weights = _epoch_means(self._caf_epoch_values)
        shares = _epoch_means(self._caf_share_values) if self._caf_share_values else [math.nan] * len(weights)
        self._caf_history[self.current_epoch] = weights
        self._caf_share_history[self.current_epoch] = shares
        self.print_to_log_file(f"CAF global-branch weight a_G per stage (strides {self._stage_strides()}):",
                               [round(v, 4) for v in weights], "; effective global share:",
                               [round(v, 4) for v in shares])
        if self.local_rank == 0:
            self._save_caf_history()

    def _stage_strides(self) -> list[list[int]] | None:
        return None if self.network is None else [list(s) for s in self._fias().encoder.strides]

    def _caf_paths(self) -> tuple[str, str]:
        return os.path.join(self.output_folder, CAF_JSON), os.path.join(self.output_folder, CAF_PNG)

    def _load_caf_history(self) -> None:
        """On ``--c``, keep the epochs the checkpoint covers (a crash may have logged one more)."""
        json_path, _ = self._caf_paths()
        self._caf_history, self._caf_share_history = {}, {}
        if self.current_epoch > 0 and os.path.isfile(json_path):
            try:
                with open(json_path) as f:
                    saved = json.load(f)
                for key, history in (("global_weight", self._caf_history), ("global_share", self._caf_share_history)):
                    history.update({int(e): [math.nan if v is None else float(v) for v in w]
                                    for e, w in zip(saved["epochs"], saved.get(key, []))
                                    if int(e) < self.current_epoch})
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.print_to_log_file(f"Could not read {json_path} ({e}); the CAF history restarts here.")

    def _save_caf_history(self) -> None:
        json_path, png_path = self._caf_paths()
        epochs = sorted(self._caf_history)
        weights = [self._caf_history[e] for e in epochs]
        shares = [self._caf_share_history.get(e, [math.nan] * len(w)) for e, w in zip(epochs, weights)]
        payload = {
            "description": "Per stage's CAF block, averaged over the epoch's training iterations: global_weight is "
                           "the mean weight a_G of the global (DilateFormer) branch (the local DMK branch gets "
                           "1 - a_G); global_share is the global branch's effective share of the fused feature, "
                           "mean|a_G G| / (mean|a_G G| + mean|a_L L|), which also reflects the branches' scales.",
            "trainer": self.__class__.__name__, "preset": self.fias_preset,
            "stage_strides": self._stage_strides(), "epochs": epochs, "global_weight": _strict_json(weights),
            "global_share": _strict_json(shares),
        }
        atomic_write_json(json_path, payload, indent=1, allow_nan=False)
        self._plot_caf(epochs, weights, shares, self._stage_strides(), png_path)

    @staticmethod
    def _plot_caf(epochs: list[int], weights: list[list[float]], shares: list[list[float]],
                  strides: list[list[int]] | None, png_path: str):
        """Draw and save the figure in its own style; returns it."""
        with caf_plot_style():
            fig = caf_figure(epochs, weights, shares, strides)
            atomic_savefig(fig, png_path)
        return fig


# Our sizes on top of matplotlib's defaults.
CAF_PLOT_RC = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "figure.titlesize": 12, "lines.linewidth": 1.5, "lines.markersize": 4,
    "axes.grid": True, "grid.alpha": 0.4,
}


@contextlib.contextmanager
def caf_plot_style():
    """Matplotlib's default style plus :data:`CAF_PLOT_RC`, for this block only. nnU-Net's progress plot sets a
    global seaborn style with font_scale 2.5 in the same process (``sns.set``), which would otherwise make this
    figure's text several times too large; text takes its size when created, so create and save inside."""
    import matplotlib.style
    from matplotlib import rc_context

    with matplotlib.style.context("default"), rc_context(CAF_PLOT_RC):
        yield


def caf_figure(epochs: list[int], weights: list[list[float]], shares: list[list[float]],
               strides: list[list[int]] | None):
    """The CAF balance figure: two panels, one legend below them (not over the curves)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    panels = ((weights, "CAF weight a_G of the global branch"), (shares, "effective share of the global branch"))
    axes = fig.subplots(1, 2)
    for ax, (values, label) in zip(axes, panels):
        arr = np.asarray(values, dtype=float).reshape(len(epochs), -1)
        for s in range(arr.shape[1]):
            ax.plot(epochs, arr[:, s], marker="o" if len(epochs) < 30 else None,
                    label=f"stage {s + 1}" + (f" (stride {'x'.join(map(str, strides[s]))})" if strides else ""))
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)
    fig.suptitle("CAF balance: global (DilateFormer) vs local (DMK) branch")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _epoch_means(per_iteration: list[np.ndarray]) -> list[float]:
    arr = np.stack(per_iteration)
    return [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in arr.T]


def _strict_json(rows: list[list[float]]) -> list[list[float | None]]:
    return [[v if math.isfinite(v) else None for v in row] for row in rows]  # strict JSON: NaN -> null
