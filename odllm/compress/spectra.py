"""The plot of a low-rank compression: singular values per matrix type and layer, and the kept ranks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_spectra(report: dict, path: str | Path) -> Path:
    """PNG of sigma_i / sigma_1 per matrix type (one line per layer), a dot at the kept rank."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend; PNG renders with Agg

    ranks = {entry["name"]: entry["rank"] for entry in report["matrices"]}
    kinds = defaultdict(list)
    for name in report["spectra"]:
        kinds[name.rsplit(".", 1)[-1]].append(name)
    cols = min(4, max(1, len(kinds)))
    rows = -(-max(1, len(kinds)) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, (kind, names) in zip(axes, kinds.items(), strict=False):
        for depth, name in enumerate(names):
            sigma = report["spectra"][name]
            top = sigma[0] or 1.0
            normalized = [max(s / top, 1e-12) for s in sigma]
            color = colormaps["viridis"](depth / max(1, len(names) - 1))
            ax.semilogy(range(1, len(sigma) + 1), normalized, lw=0.8, color=color)
            ax.plot(ranks[name], normalized[ranks[name] - 1], "o", ms=3, color=color)
        ax.set_title(kind)
        ax.set_xlabel("index i")
    for ax in axes[len(kinds) :]:
        ax.set_axis_off()
    axes[0].set_ylabel("sigma_i / sigma_1")
    if not kinds:
        axes[0].set_axis_on()
        axes[0].text(0.5, 0.5, "no factorised matrices", ha="center", transform=axes[0].transAxes)
    settings = report["settings"]
    matrix = {True: "W S (whitened)", "asvd": "W diag(mean|x|^alpha) (ASVD)"}.get(settings["whiten"], "W")
    fig.suptitle(
        f"singular values of {matrix}, ratio={settings['ratio']}: "
        "dot = kept rank, colour = layer (dark = first)"
    )
    fig.savefig(path, dpi=120)
    return Path(path)
