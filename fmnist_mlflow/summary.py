"""A sweep's summary table: one row per config, as CSV and Markdown, beside the source report's numbers.

Rows are plain dicts (`model`, `loss`, `optimizer`, `lr`, `status`, `train_loss`, `val_loss`, `val_nll`,
`val_accuracy`, `train_seconds`, `run_id`); selection never uses `train_loss` (see `best`).
"""

from __future__ import annotations

import csv
import io

# The report's table: training loss at epoch 10, (model, loss) -> (Adam, SGD, RMSprop).
REPORT_TRAIN_LOSS = {
    ("model1", "ce"): (0.2729, 0.2451, 0.2298),
    ("model1", "bce"): (0.0444, 0.0415, 0.0422),
    ("model2", "ce"): (0.3713, 0.3457, 0.3339),
    ("model2", "bce"): (0.0660, 0.0638, 0.0641),
    ("model3", "ce"): (0.1131, 0.0641, 0.0383),
    ("model3", "bce"): (0.0040, 0.0021, 0.0031),
}
REPORT_OPTIMIZERS = ("adam", "sgd", "rmsprop")
REPORT_PICK = ("model3", "bce", "sgd")  # the lowest number in the table, which the report chose
REPORT_TEST_ACCURACY = 0.9007

# Selection metrics and whether larger is better. Training loss is deliberately absent: it rewards
# over-fitting, and CE and BCE values are on different scales.
SELECT = {"val_accuracy": True, "val_nll": False}
COLUMNS = ("model", "loss", "optimizer", "lr", "status", "train_loss", "val_loss", "val_nll", "val_accuracy",
           "train_seconds", "run_id")  # fmt: skip
LOSS_NAMES = {"ce": "CrossEntropyLoss", "bce": "BCEWithLogitsLoss"}


def row(config, status: str, history: list, run_id: str) -> dict:
    last = history[-1] if history else {}
    return {
        "model": config.model, "loss": config.loss, "optimizer": config.optimizer, "lr": config.lr,
        "status": status, "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
        "val_nll": last.get("val_nll"), "val_accuracy": last.get("val_accuracy"),
        "train_seconds": sum(m.get("epoch_seconds", 0.0) for m in history), "run_id": run_id,
    }  # fmt: skip


def best(rows: list, select: str = "val_accuracy") -> dict | None:
    """The finished row with the best `select` metric, or None when none finished."""
    done = [r for r in rows if r["status"] == "FINISHED" and r[select] is not None]
    if not done:
        return None
    pick = max if SELECT[select] else min
    return pick(done, key=lambda r: r[select])


def to_csv(rows: list) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(rows: list, select: str = "val_accuracy") -> str:
    """Per-config table, then the report's layout with our numbers beside the report's."""
    lines = [
        "| model | loss | optimizer | lr | status | train_loss (epoch N) | val_nll | val_accuracy | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"
        lines.append(
            f"| {r['model']} | {r['loss']} | {r['optimizer']} | {r['lr']:g} | {r['status']} | "
            f"{_fmt(r['train_loss'])} | {_fmt(r['val_nll'])} | {acc} | {r['train_seconds']:.0f} |"
        )
    by_key = {(r["model"], r["loss"], r["optimizer"]): r for r in rows}
    lines += ["", "Final training loss, ours (report's) - the report's only column; CE and BCE are not comparable:", "",
              "| model | loss | Adam | SGD | RMSprop |", "|---|---|---|---|---|"]
    for (model, loss), theirs in REPORT_TRAIN_LOSS.items():
        cells = [f"{_fmt(by_key.get((model, loss, o), {}).get('train_loss'))} ({t:.4f})"
                 for o, t in zip(REPORT_OPTIMIZERS, theirs)]
        lines.append(f"| {model} | {LOSS_NAMES[loss]} | " + " | ".join(cells) + " |")
    lines += ["", "Validation accuracy (what selection uses), same layout:", "",
              "| model | loss | Adam | SGD | RMSprop |", "|---|---|---|---|---|"]
    for model, loss in REPORT_TRAIN_LOSS:
        cells = []
        for o in REPORT_OPTIMIZERS:
            acc = by_key.get((model, loss, o), {}).get("val_accuracy")
            cells.append("-" if acc is None else f"{100 * acc:.2f}%")
        lines.append(f"| {model} | {LOSS_NAMES[loss]} | " + " | ".join(cells) + " |")
    winner = best(rows, select)
    if winner:
        lines += ["", f"Best by {select}: **{winner['model']} + {winner['loss']} + {winner['optimizer']}** "
                      f"(val_accuracy {100 * winner['val_accuracy']:.2f}%, val_nll {winner['val_nll']:.4f}); "
                      f"the report picked {' + '.join(REPORT_PICK)} by training loss."]
    return "\n".join(lines) + "\n"
