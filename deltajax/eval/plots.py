"""Plots of delta-compression results (matplotlib, Agg backend, PNG files).

* `plot_spectra`: singular-value spectra of the deltas per projection type (σ_i/σ_1, the median
  over layers with the inter-quartile band), the low-rank structure Delta-CoMe and LowRank use;
* `plot_error_vs_bits`: relative reconstruction error and KL to the fine-tune against the true
  stored bits per linear parameter, one line per method;
* `plot_band_allocation`: Delta-CoMe's ranks per bit band for each matrix shape and ratio.

Pure functions of already computed numbers: they never run a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(spectra: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                 title: str = "Singular values of the fine-tuning delta") -> str:
    """σ_i/σ_1 vs rank i (log scale) per projection type; `spectra[type]` is (layers, r)."""
    if not spectra:
        raise ValueError("no spectra to plot")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted(spectra):
        s = np.asarray(spectra[name], np.float64)
        if s.ndim != 2:
            raise ValueError(f"spectra[{name!r}] must be (layers, r), got shape {s.shape}")
        rel = s / np.maximum(s[:, :1], 1e-30)
        med = np.median(rel, 0)
        x = np.arange(1, rel.shape[1] + 1)
        (line,) = axes[0].plot(x, med, label=f"{name} ({rel.shape[0]}×{rel.shape[1]})")
        axes[0].fill_between(x, np.percentile(rel, 25, 0), np.percentile(rel, 75, 0),
                             color=line.get_color(), alpha=0.15)
        energy = np.cumsum(s ** 2, 1) / np.maximum(np.sum(s ** 2, 1, keepdims=True), 1e-30)
        axes[1].plot(x / rel.shape[1], np.median(energy, 0), label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="rank i", ylabel="σ_i / σ_1 (median, IQR)",
                title=title)
    axes[1].set(xlabel="rank / min(n, k)", ylabel="energy Σ_{j≤i} σ_j² / Σ σ²",
                title="cumulative energy (median over layers)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _family(row: Mapping) -> str:
    methods = row.get("methods") or ["?"]
    name = "+".join(methods)
    cfg = row.get("method_config") or {}
    if cfg.get("name") in ("rtn", "gptq"):
        name += f" g{cfg.get('group')}"
    if (row.get("options") or {}).get("calib_windows") == 0 and cfg.get("name") in (
            "deltacome", "gptq", "deltadq", "dsnot", "featlowrank"):
        name += " data-free"
    return name


def plot_error_vs_bits(rows: Sequence[Mapping], path: str | os.PathLike) -> str:
    """Relative error ‖Δ−Δ̂‖/‖Δ‖ and KL to the fine-tune vs true bits per linear parameter."""
    if not rows:
        raise ValueError("no rows to plot")
    plt = _plt()
    fams: dict[str, list] = {}
    for r in rows:
        fams.setdefault(_family(r), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fam, rs in sorted(fams.items()):
        rs = sorted(rs, key=lambda r: r["bits_per_param"])
        x = [r["bits_per_param"] for r in rs]
        axes[0].plot(x, [r["rel_error"] for r in rs], "o-", label=fam)
        axes[1].plot(x, [r["metrics"]["kl"] for r in rs], "o-", label=fam)
    for ax, yl in zip(axes, ("mean relative error ‖Δ−Δ̂‖/‖Δ‖", "KL(fine-tune ‖ compressed), "
                                                                 "nats/token")):
        ax.set(xscale="log", xlabel="stored bits per linear parameter (true)", ylabel=yl)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        for b, lab in ((2.0, "1/8"), (1.0, "1/16"), (0.5, "1/32"), (0.25, "1/64"),
                       (0.125, "1/128")):
            ax.axvline(b, color="gray", lw=0.5, ls=":")
            ax.text(b, 1.0, lab, transform=ax.get_xaxis_transform(), fontsize=7, ha="center",
                    va="bottom", color="gray")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_band_allocation(allocs: Mapping[str, Mapping[str, Sequence]], path: str | os.PathLike,
                         ) -> str:
    """Stacked ranks per bit band: `allocs[ratio label][shape "n×k"] = [(bits, rank), ...]`."""
    if not allocs:
        raise ValueError("no allocations to plot")
    plt = _plt()
    bits_all = sorted({int(b) for a in allocs.values() for bands in a.values()
                       for b, _ in bands}, reverse=True)
    colors = {b: c for b, c in zip(bits_all, plt.cm.viridis(np.linspace(0.1, 0.9,
                                                                        max(len(bits_all), 1))))}
    labels, stacks = [], []
    for ratio, per_shape in allocs.items():
        for shape, bands in sorted(per_shape.items()):
            labels.append(f"{ratio}\n{shape}")
            stacks.append({int(b): int(r) for b, r in bands})
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4))
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for b in bits_all:
        h = np.array([s.get(b, 0) for s in stacks], float)
        ax.bar(x, h, bottom=bottom, color=colors[b], label=f"{b}-bit band")
        bottom += h
    for xi, tot in zip(x, bottom):
        ax.text(xi, tot, f"{int(tot)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="rank (singular vectors kept)", title="Delta-CoMe bit allocation per band")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(report: Mapping, out_dir: str | os.PathLike, *, prefix: str = "quality",
                spectra: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """The report's PNGs beside its table: spectra, error vs bits, Delta-CoMe bands."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if spectra:
        paths.append(plot_spectra(spectra, out / f"{prefix}_spectra.png"))
    rows = [r for r in report.get("rows", ()) if r.get("bits_per_param")]
    if rows:
        paths.append(plot_error_vs_bits(rows, out / f"{prefix}_error_vs_bits.png"))
    allocs: dict[str, dict] = {}
    for r in rows:
        cfg = r.get("method_config") or {}
        if cfg.get("name") == "deltacome" and r.get("band_allocation"):
            allocs.setdefault(f"α=1/{1 / cfg['ratio']:.4g}", r["band_allocation"])
    if allocs:
        paths.append(plot_band_allocation(allocs, out / f"{prefix}_deltacome_bands.png"))
    return paths
