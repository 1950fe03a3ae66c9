"""Size a text model's training and evaluation batches from its own dataset: dict inputs, the longest sample.

    python examples/text_classifier.py              # on the best device here
    python examples/text_classifier.py --simulate   # on a simulated 16 GiB Mac, held to 256 MiB

A 2-layer transformer encoder classifier takes ``input_ids`` and ``attention_mask`` (and ``labels``, as Hugging
Face models do). The dataset has sequences of 32 to 256 tokens; a padding collator pads each batch to its longest
sample, so the batch that needs the most memory is copies of the longest one: ``dataset=`` finds it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mps_autobatch import find_safe_batch_size

VOCAB = 5000


class TextClassifier(nn.Module):
    def __init__(self, d_model: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def pad_to_longest(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A padding collator: every batch as long as its longest sample."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        mask[row, : len(sample["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([s["labels"] for s in samples])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="probe a simulated 16 GiB Mac, held to 256 MiB")
    args = parser.parse_args()

    torch.manual_seed(0)
    lengths = torch.randint(32, 257, (1000,)).tolist()
    dataset = [{"input_ids": torch.randint(VOCAB, (n,)), "labels": torch.tensor(n % 4)} for n in lengths]
    model = TextClassifier()

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, batch["labels"])

    options: dict = {"dataset": dataset, "collate_fn": pad_to_longest, "loss_fn": loss_fn}
    if args.simulate:
        from mps_autobatch.simulate import simulated_backend

        options |= {"device": simulated_backend("mps:16GiB"), "memory_limit": "256MiB"}
    train = find_safe_batch_size(model, **options)
    evaluation = find_safe_batch_size(model, mode="eval", **options)
    print(f"train batch size {train.batch_size} (trials {[t.batch_size for t in train.trials]})")
    print(f"eval batch size {evaluation.batch_size} (trials {[t.batch_size for t in evaluation.trials]})")
    print(f"longest sample: index {train.example_index}, {lengths[train.example_index]} tokens")


if __name__ == "__main__":
    main()
