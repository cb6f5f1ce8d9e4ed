"""Pictures of probe results: labelled grids of maps and a plot of the curves (matplotlib).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so no
pyplot backend is switched (safe in notebooks). Several runs (``attnctl probe --compare``)
go side by side: grids one next to the other, curves in the same axes (run A solid,
run B dashed).
"""

from __future__ import annotations

import io
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from strategies.probe_cross_maps import CrossMaps
from strategies.probe_curves import Curves
from strategies.probe_self_pca import SelfPca



class ProbedRun(Protocol):
    """What a picture needs of a probed run (``probing.run.ProbeRun`` has it); named here
    so this module draws without importing the runner."""

    label: str
    image: Image.Image
    mask: np.ndarray
    results: dict[str, Any]
    token_labels: dict[int, str]

#: side of one map cell in pixels (maps are upsampled to at most this)
CELL = 96
DPI = 100
INSTALL_HINT = 'pip install -e ".[probe]"'
_STYLES = ("-", "--", ":", "-.")


def _figure(width_px: float, height_px: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(f"probe pictures need matplotlib, which is not installed: {INSTALL_HINT}") from None
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images next to each other on white, top-aligned."""
    if len(images) == 1:
        return images[0]
    width = sum(i.width for i in images)
    out = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def _cell_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a cell: the image's aspect, the longer side CELL pixels."""
    w, h = image_size
    scale = CELL / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _resized(array: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A float map [H, W] (or RGB [H, W, 3]) resized to ``size`` (w, h): bilinear or nearest."""
    method = Image.BILINEAR if smooth else Image.NEAREST
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, method))
    return np.stack([_resized(array[..., c], size, smooth) for c in range(array.shape[-1])], axis=-1)


def _step_label(step: int, timestep: float) -> str:
    return f"step {step}\nt={timestep:g}"


def _grid_label(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


# --------------------------------------------------------------------------- cross maps
def cross_maps_picture(run: ProbedRun, result: CrossMaps, image_index: int = 0) -> Image.Image:
    """Rows = steps (one block per token grid), columns = tokens; each map scaled to its own maximum."""
    positions = result.tokens.get(image_index, [])
    levels = sorted(result.grids, key=lambda lv: -result.grids[lv][0] * result.grids[lv][1])
    steps = result.steps
    cell = _cell_size(run.image.size)
    mask = _resized(run.mask, cell, smooth=False)
    n_rows, n_cols = max(1, len(levels) * len(steps)), max(1, len(positions))
    height = 84 + n_rows * (cell[1] + 22)
    fig = _figure(max(360, 110 + n_cols * (cell[0] + 8)), height)
    fig.suptitle(f"{run.label}: cross-attention map per token\nrows: steps, per grid; each map stretched from its "
                 "min to its max; cyan: the mask", fontsize=9, y=1 - 4 / height)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for b, level in enumerate(levels):
        for s, (step, timestep) in enumerate(steps):
            row = b * len(steps) + s
            by_image = result.maps.get((step, level), {})
            maps = by_image.get(image_index)
            for c, position in enumerate(positions):
                ax = axes[row][c]
                ax.set_xticks([]), ax.set_yticks([])
                if maps is None:
                    continue
                cell_map = _resized(maps[c], cell, smooth=False)  # one block per patch: the grid as it is
                low, high = float(cell_map.min()), float(cell_map.max())
                ax.imshow(cell_map, cmap="inferno", vmin=low, vmax=max(high, low + 1e-12))
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.6)
                if s == 0:  # the first row of each grid block names the tokens
                    ax.set_title(f"{run.token_labels.get(position, position)!s} [{position}]", fontsize=7)
            axes[row][0].set_ylabel(f"{_step_label(step, timestep)}\n{_grid_label(result.grids[level])}", fontsize=7)
    fig.subplots_adjust(left=0.1, right=0.99, top=1 - 62 / height, bottom=0.01, wspace=0.05, hspace=0.35)
    return _to_image(fig)


# --------------------------------------------------------------------------- self-attention PCA
def self_pca_picture(run: ProbedRun, result: SelfPca, image_index: int = 0) -> Image.Image:
    """Rows = steps, columns = token grids; the top-3 components as RGB, with their variance shares."""
    levels = sorted(result.grids, key=lambda lv: -result.grids[lv][0] * result.grids[lv][1])
    steps = result.steps
    cell = _cell_size(run.image.size)
    n_rows, n_cols = max(1, len(steps)), max(1, len(levels)) + 1
    height = 84 + n_rows * (cell[1] + 26)
    fig = _figure(max(360, 110 + n_cols * (cell[0] + 10)), height)
    fig.suptitle(f"{run.label}\nself-attention PCA, top 3 components as RGB", fontsize=9, y=1 - 4 / height)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    picture = np.asarray(run.image.resize(cell, Image.BILINEAR))
    for s, (step, timestep) in enumerate(steps):
        axes[s][0].set_xticks([]), axes[s][0].set_yticks([])
        axes[s][0].set_ylabel(_step_label(step, timestep), fontsize=7)
        if s == 0:  # the image once, for orientation
            axes[s][0].imshow(picture)
            axes[s][0].set_title("final image", fontsize=7)
        else:
            for spine in axes[s][0].spines.values():
                spine.set_visible(False)
        for c, level in enumerate(levels, start=1):
            ax = axes[s][c]
            ax.set_xticks([]), ax.set_yticks([])
            rgb = result.rgb.get((step, level), {}).get(image_index)
            if rgb is None:
                continue
            ax.imshow(np.clip(_resized(rgb, cell, smooth=False), 0.0, 1.0))
            shares = "/".join(f"{100 * v:.0f}" for v in result.explained[(step, level)][image_index])
            ax.set_title(f"{_grid_label(result.grids[level])}, var {shares}%", fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.99, top=1 - 62 / height, bottom=0.01, wspace=0.05, hspace=0.35)
    return _to_image(fig)


# --------------------------------------------------------------------------- curves
def _x(result: Curves) -> np.ndarray:
    return np.array([step for step, _ in result.steps], dtype=float)


def _plot(ax, x, y, color: str, style: str, label: str) -> None:
    if np.isfinite(y).any():
        ax.plot(x, y, style, color=color, marker=".", markersize=4, linewidth=1.2, label=label)


def curves_picture(runs: Sequence[tuple[ProbedRun, Curves]], image_index: int = 0) -> Image.Image:
    """One panel per mechanism; runs in colours, the series of a panel in line styles.

    Site groups are the union over the runs (sites where some run reweights, e.g. SAMS;
    sites where some run appends keys, e.g. MAKVS; the rest), so every run is averaged over
    the same sites.
    """
    reweighted = sorted({s for _, c in runs for s in c.groups.get("reweighted", [])})
    extended = sorted({s for _, c in runs for s in c.groups.get("extended", [])})
    self_sites = sorted({s for _, c in runs for s in c.series.get("background_share", {})})
    untouched = [s for s in self_sites if s not in reweighted and s not in extended]
    bank_sites, bank_label = (extended, "bank sites") if extended else (self_sites, "all self sites")
    fig = _figure(1300, 720)
    axes = fig.subplots(2, 3).ravel()
    titles = ["object tokens: attention inside the mask (cross sites)",
              "masked queries -> background keys (share, self sites)",
              "masked queries -> appended bank keys (share)",
              f"masked vs background features, {bank_label}: RMS gap",
              "steer loss per gradient update (dotted: after it)",
              "steer update RMS / std(z): in mask (solid), outside (dashed)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("denoising step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for r, (run, result) in enumerate(runs):
        color = f"C{r}"
        x = _x(result)
        _plot(axes[0], x, result.curve("object_mass", image=image_index), color, "-", f"{run.label}: prompt tokens")
        if reweighted:
            _plot(axes[1], x, result.curve("background_share", reweighted, image_index), color, "-",
                  f"{run.label}: reweighting sites")
        if untouched:
            _plot(axes[1], x, result.curve("background_share", untouched, image_index), color, ":",
                  f"{run.label}: sites without reweighting or bank")
        _plot(axes[2], x, result.curve("bank_share", bank_sites, image_index), color, "-", f"{run.label}: {bank_label}")
        _plot(axes[3], x, result.curve("mean_gap", bank_sites, image_index), color, "-", f"{run.label}: channel means")
        _plot(axes[3], x, result.curve("std_gap", bank_sites, image_index), color, "--", f"{run.label}: channel stds")
        for g, (instance, log) in enumerate(sorted(result.guidance.items())):
            if not log:
                continue
            iterations = max(e["iteration"] for e in log) + 1
            gx = np.array([e["step"] + e["iteration"] / iterations for e in log], dtype=float)
            style = _STYLES[g % len(_STYLES)]
            _plot(axes[4], gx, np.array([e["loss"] for e in log], dtype=float), color, style, f"{run.label}: {instance}")
            if all("loss_after" in e for e in log):
                _plot(axes[4], gx, np.array([e["loss_after"] for e in log], dtype=float), color, ":",
                      f"{run.label}: {instance}, after the update")
            for key, line in (("update_rms_mask", "-"), ("update_rms_outside", "--")):
                values = np.array([e.get(key, np.nan) for e in log], dtype=float)
                _plot(axes[5], gx, values, color, line, f"{run.label}: {instance}, {key.split('_')[-1]}")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return _to_image(fig)


# --------------------------------------------------------------------------- all
def pictures(runs: Sequence[ProbedRun], image_index: int = 0) -> dict[str, Image.Image]:
    """Picture name -> image for the built-in probes present in the runs (side by side for several runs).

    Names: ``cross_maps`` / ``self_pca`` / ``curves``, suffixed ``-<instance>`` when a run
    has several instances of one probe kind. Results of other probes are left to their
    numbers (``ProbeRun.record``).
    """
    out: dict[str, Image.Image] = {}
    kinds = ((CrossMaps, "cross_maps", cross_maps_picture), (SelfPca, "self_pca", self_pca_picture))
    instances = sorted({name for run in runs for name in run.results})
    for cls, kind, draw in kinds:
        names = [n for n in instances if any(isinstance(run.results.get(n), cls) for run in runs)]
        for name in names:
            drawn = [draw(run, run.results[name], image_index) for run in runs if isinstance(run.results.get(name), cls)]
            out[kind if len(names) == 1 else f"{kind}-{name}"] = side_by_side(drawn)
    curve_names = [n for n in instances if any(isinstance(run.results.get(n), Curves) for run in runs)]
    for name in curve_names:
        pairs = [(run, run.results[name]) for run in runs if isinstance(run.results.get(name), Curves)]
        out["curves" if len(curve_names) == 1 else f"curves-{name}"] = curves_picture(pairs, image_index)
    return out

