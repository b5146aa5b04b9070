"""Every epoch's validation metrics, for metrics.json: the curve shows whether a schedule ended while still rising."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ValidationHistory(Callback):
    """Collects ``val/*`` after each validation; kept in checkpoints, so a resumed run reports every epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/"):
                row[name.removeprefix("val/")] = float(value)
        self.epochs.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])
