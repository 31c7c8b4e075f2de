"""A test program: a tiny random Llama trained by the Hugging Face Trainer on CPU with btune's BtuneCallback.

usage: hf_train.py OUT.json [LOGGING_STEPS]

32 random sequences of 5 to 16 tokens (right-padded in each batch), batches of 2, gradient accumulation 2:
8 optimizer steps in one epoch, in the dataset's order; an evaluation every 4 steps. OUT.json gets what the
Trainer itself logged (``state.log_history``), the model's parameter count and the non-padding tokens of each
optimizer step counted from the dataset, for the test to hold the run's record against.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from btune.integrations.transformers import BtuneCallback

VOCAB, PAD = 128, 0
N_TRAIN, N_EVAL, BATCH, ACCUM = 32, 8, 2, 2


def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pads a batch: pad id 0, attention_mask 0 and label -100 on the padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        seq, pad = f["input_ids"], width - len(f["input_ids"])
        ids.append(seq + [PAD] * pad)
        mask.append([1] * len(seq) + [0] * pad)
        labels.append(seq + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def dataset(rng: random.Random, n: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": [rng.randrange(1, VOCAB) for _ in range(rng.randint(5, 16))]} for _ in range(n)]


def main(out: str, logging_steps: int) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    train, evals = dataset(rng, N_TRAIN), dataset(rng, N_EVAL)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
            per_device_eval_batch_size=4, num_train_epochs=1, learning_rate=1e-3, warmup_steps=2,
            lr_scheduler_type="linear", logging_steps=logging_steps, eval_strategy="steps", eval_steps=4,
            save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
            dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collate,
                          callbacks=[BtuneCallback()])
        trainer.train()
    per_step = BATCH * ACCUM
    tokens = [sum(len(f["input_ids"]) for f in train[i:i + per_step]) for i in range(0, N_TRAIN, per_step)]
    result: dict[str, Any] = {
        "log_history": trainer.state.log_history,
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "global_step": trainer.state.global_step,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
