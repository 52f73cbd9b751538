"""PNG plots people would rather see than read: affinity heatmaps and masks per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_affinity(by_layer: dict[int, dict], domain_names: list[str], path: Path) -> Path:
    """One row per MoE layer: the affinity A_hat (colour) with the mask M outlined."""
    layers = sorted(by_layer)
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 0.5 * len(domain_names) * len(layers)),
                             squeeze=False)
    for axis, layer in zip(axes[:, 0], layers):
        affinity = np.asarray(by_layer[layer]["affinity"], dtype=float)
        mask = np.asarray(by_layer[layer]["mask"], dtype=bool)
        image = axis.imshow(affinity, aspect="auto", cmap="viridis", vmin=0)
        rows, cols = np.nonzero(mask)
        axis.scatter(cols, rows, marker="s", s=40, facecolors="none", edgecolors="white",
                     linewidths=1.2, label="mask M = 1")
        axis.set_yticks(range(len(domain_names)), domain_names)
        axis.set_xlabel("expert")
        axis.set_title(f"layer {layer}: affinity A_hat (colour), associated experts (squares)")
        fig.colorbar(image, ax=axis, fraction=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
