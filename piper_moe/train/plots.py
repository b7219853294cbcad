"""The plots of a finished run (rank 0): loss against the data's floor, expert load over time."""

from __future__ import annotations

from pathlib import Path


def plot_run(result: dict, out: Path) -> list[Path]:
    """result: what piper_moe.train writes to metrics.json. Returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    hist = result["history"]
    if not hist:
        return []
    steps = [h["step"] for h in hist]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["loss"] for h in hist], label="training loss (cross entropy)")
    if result.get("floor") is not None:
        ax.axhline(result["floor"], color="k", ls="--",
                   label=f"floor: entropy rate {result['floor']:.3f} nats/token")
    for mig in result.get("migrations", []):
        ax.axvline(mig["step"], color="tab:red", alpha=0.3, lw=1)
    lay = result["report"]["layout"]
    ax.set(xlabel="step", ylabel="nats / token",
           title=f"{result['config']['model']}: pp={lay['pp']} dp={lay['dp']} ep={lay['ep']}")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    loads = result.get("expert_load") or {}
    if loads:
        fig, axes = plt.subplots(1, len(loads), figsize=(3.6 * len(loads) + 1, 3.6),
                                 squeeze=False, layout="constrained")
        im = None
        for ax, (layer, per_step) in zip(axes[0], loads.items()):
            arr = np.array(per_step, dtype=float)
            arr = arr / np.maximum(arr.sum(axis=1, keepdims=True), 1)
            im = ax.imshow(arr.T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0], steps[-1], -0.5, arr.shape[1] - 0.5))
            ax.set(xlabel="step", ylabel="expert", title=f"MoE layer {layer}")
        for mig in result.get("migrations", []):
            for ax in axes[0]:
                ax.axvline(mig["step"], color="w", alpha=0.6, lw=1)
        fig.colorbar(im, ax=list(axes[0]), label="share of routed tokens")
        fig.suptitle("tokens per expert (logical ids); white lines: expert migrations",
                     fontsize=10)
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
