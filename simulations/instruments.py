"""The DP-SGD instruments as a picture: clip fraction and signal-to-noise per round.

A simulation-only diagnostic written into the run folder (``instruments.png``),
from the devices' own per-round figures in ``report.json["training"]``: the
share of per-sample gradients the clip cut (mean over devices), and the mean
clipped-gradient norm against the noise std (signal-to-noise; below 1 the
noise dominates each step), over all coordinates and per tier over its own.
Nothing here goes on the wire.
"""

from __future__ import annotations

from pathlib import Path

from simulations.audits.report_html import new_figure, figure_to_png

FILE = "instruments.png"


def instruments_png(training: list[dict]) -> bytes | None:
    """Two panels over rounds (clip fraction; signal-to-noise, log scale), or None when no round ran DP-SGD."""
    rows = [r for r in training if r.get("dp_sgd")]
    if not rows:
        return None
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    figure = new_figure(width=8.0, height=3.2)
    clip_axes, snr_axes = figure.subplots(1, 2)
    clip_axes.plot(rounds, [r["dp_sgd"].get("clip_fraction", float("nan")) for r in rows], marker="o", label="record level (DP-SGD)")
    if any("clip_fraction" in r for r in rows):
        clip_axes.plot(rounds, [r.get("clip_fraction", float("nan")) for r in rows], marker="s", label="user level (update)")
    clip_axes.set(title="clip fraction", xlabel="round", ylabel="share clipped", ylim=(-0.02, 1.02))
    clip_axes.legend(frameon=False)
    snr_axes.plot(rounds, [r["dp_sgd"].get("snr", float("nan")) for r in rows], marker="o", label="all coordinates")
    for tier in sorted({t for r in rows for t in r["dp_sgd"].get("snr_by_tier", {})}):
        snr_axes.plot(rounds, [r["dp_sgd"].get("snr_by_tier", {}).get(tier, float("nan")) for r in rows],
                      marker=".", linestyle=":", label=f"{tier} tier")
    snr_axes.legend(frameon=False, fontsize="small")
    snr_axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    snr_axes.set(title="signal-to-noise per step", xlabel="round", ylabel="|mean clipped grad| / |noise|")
    snr_axes.set_yscale("log")
    for axes in (clip_axes, snr_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
    return figure_to_png(figure)


def write_instruments(run_dir: Path, training: list[dict]) -> Path | None:
    png = instruments_png(training)
    if png is None:
        return None
    path = Path(run_dir) / FILE
    path.write_bytes(png)
    return path
