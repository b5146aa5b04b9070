"""The plots of a low-rank compression: singular values per matrix type and layer with the kept ranks, and the
ranks a loss allocation chose per layer and matrix."""

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


def plot_ranks(report: dict, path: str | Path) -> Path:
    """PNG of the rank each matrix got per layer (allocation=loss), beside the uniform ratio's rank (dashed).

    A matrix kept dense is drawn as a hatched bar at the rank where factorising stops saving parameters.
    """
    from matplotlib.figure import Figure

    allocation = report["settings"].get("allocation") or {}
    if "ranks" not in allocation:
        raise ValueError("the report has no allocated ranks: plot_ranks needs a run with allocation=loss")
    shapes = {entry["name"]: entry["shape"] for entry in report["matrices"]}
    kinds = defaultdict(list)
    for name in allocation["ranks"]:
        kinds[name.rsplit(".", 1)[-1]].append(name)
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (kind, names) in zip(axes, kinds.items(), strict=False):
        for depth, name in enumerate(names):
            m, n = shapes[name]
            rank, uniform = allocation["ranks"][name], allocation["uniform_ranks"][name]
            dense = rank == "dense"
            height = (m * n) // (m + n) if dense else rank
            ax.bar(depth, height, color="0.75" if dense else "tab:blue", hatch="//" if dense else None)
            if uniform != "dense":
                ax.hlines(uniform, depth - 0.4, depth + 0.4, colors="tab:red", linestyles="dashed")
        ax.set_title(f"{kind} {shapes[names[0]][0]}x{shapes[names[0]][1]}")
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(names)))
    for ax in axes[len(kinds) :]:
        ax.set_axis_off()
    axes[0].set_ylabel("rank")
    fig.suptitle(
        f"ranks allocated by loss ({allocation['importance']} weights), ratio={report['settings']['ratio']}: "
        f"{allocation['allocated_params']:,} of {allocation['budget_params']:,} parameters; "
        "dashed = uniform rank, hatched = kept dense"
    )
    fig.savefig(path, dpi=120)
    return Path(path)
