"""Tiny Hugging Face models built from configs (no download), a word-level tokenizer and token datasets."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

VOCAB = 1000


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=512, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def classification_data(lengths: list[int], seed: int = 0) -> list[dict[str, object]]:
    """Tokenised samples of the given lengths, as lists (what a tokenizer returns), with a class label."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(2, VOCAB, (n,), generator=generator).tolist(), "label": i % 2}
        for i, n in enumerate(lengths)
    ]


def lm_data(lengths: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=generator)
        samples.append({"input_ids": ids, "labels": ids.clone()})
    return samples


def bert_trainer(folder: str, *, per_device: int = 8, accumulation: int = 8, **options: object) -> Trainer:
    """A quiet CPU Trainer of the tiny BERT on mixed-length data: no logging, no saving, one epoch."""
    args = TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **options,
    )
    lengths = [32 + (i * 37) % 224 for i in range(256)]
    return Trainer(
        model=bert(),
        args=args,
        train_dataset=classification_data(lengths),
        eval_dataset=classification_data(lengths[:64], seed=1),
        data_collator=DataCollatorWithPadding(tokenizer()),
    )
