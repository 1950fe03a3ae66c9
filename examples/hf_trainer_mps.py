"""A Hugging Face Trainer with measured batch sizes: `tune_trainer` before `train()` keeps the effective batch.

    python examples/hf_trainer_mps.py              # on the best device here
    python examples/hf_trainer_mps.py --simulate   # on a simulated 16 GiB Mac, held to 512 MiB

A tiny BERT classifier built from a config (no download) on random token data of mixed lengths, padded per batch
by DataCollatorWithPadding. `auto_find_batch_size=True` would restart training at 0.9x after every out-of-memory
error and change the effective batch; `tune_trainer` measures once and keeps 64 as micro-batch x accumulation.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from mps_autobatch.transformers import tune_trainer

VOCAB = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="a simulated 16 GiB Mac, held to 512 MiB")
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )
    model = BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    )
    lengths = [32 + (i * 37) % 224 for i in range(256)]
    data = [{"input_ids": torch.randint(2, VOCAB, (n,)).tolist(), "label": i % 2} for i, n in enumerate(lengths)]
    folder = tempfile.mkdtemp()
    training = TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=8,
        num_train_epochs=1,
        use_cpu=args.simulate,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        eval_dataset=data[:64],
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    options = {}
    if args.simulate:
        from mps_autobatch.simulate import simulated_backend

        options = {"device": simulated_backend("mps:16GiB"), "memory_limit": "512MiB"}
    result = tune_trainer(trainer, **options)
    a = trainer.args
    print(f"largest safe batch {result.batch_size} in {len(result.trials)} trials")
    print(
        f"per device {a.per_device_train_batch_size} x accumulation {a.gradient_accumulation_steps} = "
        f"{a.per_device_train_batch_size * a.gradient_accumulation_steps}; eval batch {a.per_device_eval_batch_size}"
    )
    trainer.train()
    print(f"trained {trainer.state.global_step} updates")


if __name__ == "__main__":
    main()
