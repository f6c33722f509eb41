"""PNG plots of a run's metrics.jsonl: loss (train and validation), learning rate, expert load.

Expert load is drawn as MaxVio per MoE layer (max load / mean load - 1, the balance measure of
the aux-loss-free balancing paper): 0 is perfect balance.
"""

from __future__ import annotations

import json
from pathlib import Path



def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a crash: skip it
                continue
    return rows


def plot_run(metrics: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png and expert_load.png into out_dir; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")   # files only, never a window (imported here: a second of startup otherwise)
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train CE", lw=1)
        if any(r.get("mtp_ce") for r in train):
            ax.plot([r["step"] for r in train], [r["mtp_ce"] for r in train], label="train MTP CE (next-next token)",
                    lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation CE")
    ax.set(xlabel="step", ylabel="nats / token", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(plt, fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    written.append(_save(plt, fig, out_dir / "lr.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    loads = [r for r in train if r.get("maxvio")]
    if loads:
        for layer in range(len(loads[0]["maxvio"])):
            ax.plot([r["step"] for r in loads], [r["maxvio"][layer] for r in loads], lw=1, label=f"MoE layer {layer}")
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="max load / mean load - 1", title="expert load imbalance (MaxVio)")
    ax.grid(alpha=0.3)
    written.append(_save(plt, fig, out_dir / "expert_load.png"))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
