"""Small token models built in torch, for the dict-input tests: nothing downloaded, nothing from transformers.

`EncoderClassifier` takes ``input_ids``, ``attention_mask`` and ``labels`` and returns logits (its loss is the
caller's ``loss_fn``); `TinyCausalLM` returns an output object with ``.loss``, as Hugging Face models do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 1000


def token_sample(length: int, *, labels: str = "class") -> dict[str, torch.Tensor]:
    """One tokenised sample of ``length`` tokens: ids, mask, and a class label or the ids as LM labels."""
    ids = torch.randint(VOCAB, (length,))
    sample = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)}
    sample["labels"] = torch.tensor(1) if labels == "class" else ids.clone()
    return sample


class EncoderClassifier(nn.Module):
    """Embedding, a 2-layer transformer encoder, mean pooling over the mask, a linear classifier."""

    def __init__(self, d_model: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def classifier_loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(output, batch)`` for `EncoderClassifier`."""
    return nn.functional.cross_entropy(output, batch["labels"])


@dataclass
class LMOutput:
    """What a Hugging Face causal LM returns, reduced to what the probe reads."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyCausalLM(nn.Module):
    """A GPT-style LM: embedding, 2 causal transformer layers, a tied head; ``.loss`` when given labels."""

    def __init__(self, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> LMOutput:
        length = input_ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        hidden = self.blocks(self.embed(input_ids), mask=causal, is_causal=True)
        logits = hidden @ self.embed.weight.T
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return LMOutput(loss, logits)
