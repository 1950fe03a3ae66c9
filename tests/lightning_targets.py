"""A small LightningModule for the callback's tests, and a 2-process DDP run of it (``python lightning_targets.py``).

The DDP run is a script because Lightning's "ddp" strategy starts the other rank by running the script again.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(L.LightningModule):
    """256-2048-2048-10 on random vectors; logs in its steps, as most modules do. Records its batch sizes."""

    def __init__(self, batch_size: int = 8, eval_batch_size: int = 8, manual: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        self.automatic_optimization = not manual
        # Built here, before the fit: the simulated Mac counts every tensor made while it measures, host data too.
        self.train_data = TensorDataset(torch.randn(8192, 256), torch.randint(10, (8192,)))
        self.val_data = TensorDataset(torch.randn(4096, 256), torch.randint(10, (4096,)))
        self.seen: list[int] = []
        self.seen_eval: list[int] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.seen.append(len(x))
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.seen_eval.append(len(x))
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_data, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=self.hparams.eval_batch_size)


def trainer(callbacks: list, folder: str, **options: object) -> L.Trainer:
    """A quiet CPU trainer that writes nothing: no logger, no checkpoints, no progress bar."""
    settings = dict(
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=folder,
    )
    return L.Trainer(callbacks=callbacks, **{**settings, **options})  # type: ignore[arg-type]


if __name__ == "__main__":
    from mps_autobatch.lightning import BatchSizeFinder
    from mps_autobatch.simulate import simulated_backend

    finder = BatchSizeFinder(requested=4096, device=simulated_backend("mps:16GiB"), memory_limit="300MiB")
    run = trainer([finder], sys.argv[1], devices=2, strategy="ddp", max_steps=1)
    module = MLP()
    run.fit(module)
    assert finder.result is not None
    line = "RESULT " + json.dumps(
        {
            "rank": run.global_rank,
            "micro": finder.optimal_batch_size,
            "accumulation": run.accumulate_grad_batches,
            "trials": [t.batch_size for t in finder.result.trials],
            "seen": module.seen[-4:],
        }
    )
    # One write of the whole line: both ranks share the pipe, and print's text and newline could interleave.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())
