"""A picture of a training run from its metrics.jsonl: loss, throughput and stall by step."""

from __future__ import annotations

import os

from trainer.metrics import current, read_metrics


def plot_training(metrics_path: str, png_path: str) -> str:
    """Write ``png_path`` (loss; samples/s with the stall share; held-out accuracy). Steps
    that a resume replaced are left out: each step is drawn as the run that stands trained it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = current(records, "step")
    evals = current(records, "eval")
    restarts = [r["step"] for r in records if r["event"] == "start" and r.get("resumed_from")]
    figure, (loss_axis, speed_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
    loss_axis.set_ylabel("loss")
    if evals:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-",
                           color="tab:green", label="held-out accuracy")  # fmt: skip
        accuracy_axis.set_ylabel("held-out accuracy")
        accuracy_axis.set_ylim(0, 1)
    speed_axis.plot([r["step"] for r in steps], [r["samples_per_s"] for r in steps], lw=1,
                    label="samples/s")  # fmt: skip
    speed_axis.set_ylabel("samples/s")
    stall_axis = speed_axis.twinx()
    stall_axis.plot([r["step"] for r in steps], [100 * r["stall_fraction"] for r in steps],
                    lw=1, color="tab:red", alpha=0.6)  # fmt: skip
    stall_axis.set_ylabel("stall % of step", color="tab:red")
    for step in restarts:
        for axis in (loss_axis, speed_axis):
            axis.axvline(step, color="gray", ls="--", lw=0.8)
    speed_axis.set_xlabel("step" + (" (dashed: resumed from a checkpoint)" if restarts else ""))
    loss_axis.legend(loc="upper right")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
