"""Train a tiny random Llama with a real Hugging Face ``Trainer`` on CPU for a few steps, logging every step.

Its stdout is what ``btune run --parse hf`` reads: ``hf_trainer.log`` beside this file was captured from it
(``python tests/data/logs/hf_trainer_run.py HISTORY.json > tests/data/logs/hf_trainer.log``). The Trainer's own
``state.log_history`` is written as JSON to the path given as the first argument, to check a parse against.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

STEPS = 8
SEQ = 32
VOCAB = 256


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences, labels the same as the inputs (the model shifts them)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(history_path: str) -> None:
    set_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, learning_rate=1e-3, logging_steps=1,
                                 eval_strategy="steps", eval_steps=4, save_strategy="no", report_to="none",
                                 use_cpu=True, seed=0, include_num_input_tokens_seen=True)
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64, 1), eval_dataset=RandomTokens(8, 2))
        trainer.train()
    with open(history_path, "w") as f:
        json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main(sys.argv[1])
