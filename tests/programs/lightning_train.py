"""A test program: a tiny random language model trained by Lightning on CPU with btune's BtuneCallback.

usage: lightning_train.py OUT.json

32 random sequences of 5 to 16 tokens (right-padded in each batch, dict batches with ``attention_mask``),
batches of 2, ``accumulate_grad_batches=2``: 8 optimizer steps in one epoch, in the dataset's order; a sanity
check, a validation after 4 steps and one at the epoch's end. OUT.json gets what the LightningModule itself
saw (each batch's loss and non-padding tokens, the learning rate of each optimizer step), the parameter count
and the tokens of each optimizer step counted from the dataset, for the test to hold the run's record against.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]

from btune.integrations.lightning import BtuneCallback

VOCAB, PAD = 128, 0
N_TRAIN, N_EVAL, BATCH, ACCUM = 32, 8, 2, 2


def collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pads a batch: pad id 0, attention_mask 0 on the padding."""
    width = max(len(s) for s in seqs)
    return {"input_ids": torch.tensor([s + [PAD] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])}


class TinyLM(pl.LightningModule):
    """An embedding and a projection back to the vocabulary: next-token loss over the non-padding tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB)
        self.batches: list[dict[str, Any]] = []  #: what training_step saw, batch by batch
        self.lrs: list[float] = []  #: the learning rate of each optimizer step

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.head(torch.tanh(self.mix(self.embed(ids[:, :-1]))))
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.batches.append({"tokens": int(batch["attention_mask"].sum()), "loss": loss.item()})
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(out: str) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    seqs = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(5, 16))] for _ in range(N_TRAIN + N_EVAL)]
    train, evals = seqs[:N_TRAIN], seqs[N_TRAIN:]
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=False, collate_fn=collate)
    val_loader = torch.utils.data.DataLoader(evals, batch_size=4, shuffle=False, collate_fn=collate)
    module = TinyLM()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=ACCUM,
                         val_check_interval=N_TRAIN // BATCH // 2, num_sanity_val_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BtuneCallback()])
    trainer.fit(module, loader, val_loader)
    per_step = BATCH * ACCUM
    result = {
        "batches": module.batches,
        "lrs": module.lrs,
        "n_params": sum(p.numel() for p in module.parameters()),
        "tokens_per_step": [sum(len(s) for s in train[i:i + per_step]) for i in range(0, N_TRAIN, per_step)],
        "global_step": trainer.global_step,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
