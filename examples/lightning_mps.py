"""A LightningModule trained with a measured batch size: `BatchSizeFinder(requested=...)` keeps the effective batch.

    python examples/lightning_mps.py              # on the best device here (MPS, CUDA or CPU)
    python examples/lightning_mps.py --simulate   # on a simulated 16 GiB Mac, held to 256 MiB

Lightning's own finder grows the batch until it crashes (and does not recognise MPS's out-of-memory error);
this callback measures the module's own step and writes the micro-batch and the accumulation before the fit.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mps_autobatch.lightning import BatchSizeFinder


class Classifier(L.LightningModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        self.data = TensorDataset(torch.randn(8192, 256), torch.randint(10, (8192,)))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="a simulated 16 GiB Mac, held to 256 MiB")
    parser.add_argument("--requested", type=int, default=4096, help="the effective batch to keep")
    args = parser.parse_args()

    options = {}
    if args.simulate:
        from mps_autobatch.simulate import simulated_backend

        options = {"device": simulated_backend("mps:16GiB"), "memory_limit": "256MiB"}
    finder = BatchSizeFinder(requested=args.requested, **options)
    trainer = L.Trainer(
        callbacks=[finder],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu" if args.simulate else "auto",
    )
    trainer.fit(Classifier())
    assert finder.result is not None and finder.plan is not None
    print(f"largest safe batch {finder.result.batch_size} in {len(finder.result.trials)} trials")
    print(
        f"micro-batch {finder.optimal_batch_size} x accumulation {trainer.accumulate_grad_batches}: {finder.plan.note}"
    )
    print(f"trained {trainer.global_step} updates")


if __name__ == "__main__":
    main()
