"""``BtuneCallback``: a Lightning training loop reported through btune's reporting API.

::

    from btune.integrations.lightning import BtuneCallback

    trainer = lightning.Trainer(callbacks=[BtuneCallback()], ...)
    trainer.fit(module, train_loader, val_loader)  # under btune: btune run -- python train.py

It imports ``lightning.pytorch``, or ``pytorch_lightning`` where only that is installed. What it reports:

- ``meta`` at fit start: the model's name (``model_name``, else the LightningModule's class name), ``n_params``
  (every parameter, counted once), ``flops_per_token`` = 6 × n_params (a dense forward and backward; pass
  ``flops_per_token`` for a better figure), ``n_devices`` = ``trainer.world_size``, ``precision`` (from
  ``trainer.precision``: "bf16-mixed" is bf16, "16-mixed" fp16, "32-true" fp32), this rank's device, and
  ``tokens="global"``.
- one ``step`` per optimizer step (``trainer.global_step`` moved during the batch; with
  ``accumulate_grad_batches`` the batches of one step are summed). ``tokens``: each batch's tokens
  (``tokens_fn(batch)`` when given; else a dict's non-padding ``input_ids`` (the sum of its ``attention_mask``,
  or every id), a tensor's elements, or the elements of a tuple's first tensor), times ``trainer.world_size``:
  the job's tokens when every replica's batch holds as many (with tensor parallelism the replicas share a
  batch: pass ``tokens_fn``). ``loss``: the mean of the step's batch losses as ``training_step`` returned them
  (``outputs``; Lightning divides each by ``accumulate_grad_batches``, undone here). ``lr``: the first param
  group's learning rate when the optimizer stepped. The step after a checkpoint save carries the save's time and
  is marked ``warmup``, so steady state leaves it out.
- ``phase("eval")`` around validation (detail "sanity check" for the sanity check) and testing.

The token count and the loss are read once per optimizer step, which waits for the device (one host sync per
step): the host-clock step times are then the device's. Each rank sends its own events; only rank 0's tokens
count (btune's rule under torchrun).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]

import btune
from btune.integrations._common import as_float, batch_tokens, device_facts, module_precision, param_count, total

__all__ = ["BtuneCallback"]


class BtuneCallback(pl.Callback):
    """Reports a Lightning fit's optimizer steps, validation and model facts to btune (the module's docstring
    says what and how). ``tokens_fn(batch)``: a batch's tokens; ``flops_per_token``: overrides 6 × n_params;
    ``n_params``: overrides the count (a strategy that shards the module before fit start leaves this rank's
    shard); ``model_name``: overrides the module's class name."""

    def __init__(self, tokens_fn: Callable[[Any], Any] | None = None, flops_per_token: float | None = None,
                 n_params: int | None = None, model_name: str | None = None) -> None:
        self.tokens_fn = tokens_fn
        self.flops_per_token = flops_per_token
        self.n_params = n_params
        self.model_name = model_name
        self._counts: list[Any] = []  #: this optimizer step's batch token counts (ints or device tensors)
        self._losses: list[Any] = []  #: this optimizer step's batch losses (detached tensors or floats)
        self._global_step = 0
        self._lr: float | None = None
        self._after_save = False
        self._eval: Any = None  #: the open ``btune.phase("eval")``
        self._sent = False  #: whether a step was sent

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts.clear()
        self._losses.clear()
        self._global_step = trainer.global_step
        n = self.n_params if self.n_params is not None else param_count(pl_module)
        facts: dict[str, Any] = {
            "framework": "lightning", "lightning_version": pl.__version__,
            "model": self.model_name or type(pl_module).__name__, "n_params": n,
            "flops_per_token": self.flops_per_token if self.flops_per_token is not None else 6 * n,
            "n_devices": max(int(trainer.world_size), 1), "tokens": "global",
            "precision": _precision(str(trainer.precision), pl_module),
            **device_facts(pl_module.device),
        }
        btune.meta(**{k: v for k, v in facts.items() if v is not None})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        self._lr = as_float(groups[0].get("lr")) if groups else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        count = self.tokens_fn(batch) if self.tokens_fn is not None else batch_tokens(batch)
        if count is not None:
            self._counts.append(count)
        loss = _loss(outputs)
        if loss is not None:
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning's normalization, undone
            self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if trainer.global_step == self._global_step:
            return  # gradients are still accumulating
        self._global_step = trainer.global_step
        tokens = total(self._counts)
        losses = [as_float(v) for v in self._losses]
        losses = [v for v in losses if v is not None]
        self._counts.clear()
        self._losses.clear()
        metrics: dict[str, Any] = {"lr": self._lr}
        if self._after_save:
            metrics["warmup"] = True
            self._after_save = False
        btune.step(tokens=None if tokens is None else tokens * max(int(trainer.world_size), 1),
                   loss=sum(losses) / len(losses) if losses else None,
                   **{k: v for k, v in metrics.items() if v is not None})
        self._sent = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval("sanity check" if trainer.sanity_checking else None)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval("test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._after_save = True

    def _enter_eval(self, detail: str | None) -> None:
        if self._eval is None:
            self._eval = btune.phase("eval", detail)

    def _exit_eval(self) -> None:
        ctx, self._eval = self._eval, None
        if ctx is None:
            return
        ctx.__exit__(None, None, None)  # back to "starting" before the first step, else "measuring"


def _loss(outputs: Any) -> Any:
    """The loss in what ``training_step`` returned: a tensor, or a mapping's ``"loss"``; None otherwise."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, (torch.Tensor, int, float)) and not isinstance(outputs, bool) else None


def _precision(name: str, module: Any) -> str | None:
    """Lightning's precision setting as a record's precision; the module's own when the name says nothing."""
    if "transformer-engine" in name:
        return "fp8"
    if "bf16" in name:
        return "bf16"
    if name.startswith("16"):
        return "fp16"
    if name.startswith("64"):
        return "fp64"
    if name.startswith("32"):
        return "fp32"
    return module_precision(module)
