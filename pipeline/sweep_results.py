"""A finished sweep's trials as a table (Markdown and CSV) and a plot of validation accuracy
against each searched parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from ray import tune

from pipeline.common import save_figure
from pipeline.search import METRIC
from resattn.data import write_csv, write_text


def trial_table(results: tune.ResultGrid, keys: list[str], max_epochs: int) -> list[dict]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        rows.append({
            "trial": metrics.get("trial_id", "?"),
            **{key: result.config.get(key) for key in keys},
            "epochs": epochs,
            METRIC: metrics.get(METRIC),
            "stopped_early": bool(result.error is None and epochs < max_epochs),
            "status": "error" if result.error else "done",
        })
    return sorted(rows, key=lambda row: -(row[METRIC] or -1.0))


def format_table(rows: list[dict]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "—" if value is None else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(rows: list[dict], space: dict, path: Path) -> None:
    """Validation accuracy against each searched parameter, one panel each; choices are
    categories in the order listed; hollow markers: stopped early by ASHA."""
    keys = list(space)
    columns = min(4, len(keys))
    lines = -(-len(keys) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.8 * lines), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        choices = space[key].choice
        for row in rows:
            if row[METRIC] is None:
                continue
            x = choices.index(row[key]) if choices is not None else row[key]
            ax.scatter([x], [row[METRIC]], facecolors="none" if row["stopped_early"] else "C0", edgecolors="C0")
        if choices is not None:
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif space[key].loguniform is not None:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for line in axes:
        line[0].set_ylabel("val accuracy (last epoch)", fontsize=8)
    fig.suptitle("sweep trials: filled ran to the end, hollow stopped early by ASHA", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_results(rows: list[dict], space: dict, reports: Path) -> str:
    """trials.md, trials.csv and val_accuracy_vs_params.png under `reports`; returns the table."""
    table = format_table(rows)
    write_text(reports / "trials.md", table + "\n")
    write_csv(reports / "trials.csv", rows)
    plot_results(rows, space, reports / "val_accuracy_vs_params.png")
    return table
