"""``BtuneCallback``: the Hugging Face Trainer's training loop reported through btune's reporting API.

::

    from btune.integrations.transformers import BtuneCallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[BtuneCallback()])
    trainer.train()  # under btune: btune run -- python train.py

What it reports:

- ``meta`` at train begin: the model's name (its config's ``_name_or_path``, else its ``model_type``),
  ``n_params`` (every parameter, counted once, when the Trainer is built: before FSDP or DeepSpeed shard them),
  ``flops_per_token`` = 6 × n_params (a dense forward and backward; embeddings included, attention's
  sequence-length term left out: pass ``flops_per_token`` for a better figure, e.g. for LoRA, where the frozen
  weights need no weight gradients), ``n_devices`` = ``args.world_size``, ``precision`` (``args.bf16``/
  ``args.fp16``, else the model's dtype), this rank's device, and ``tokens="global"``.
- one ``step`` per optimizer step. ``tokens``: the non-padding tokens of the ``input_ids`` of every micro-batch
  of that optimizer step (the sum of ``attention_mask`` when the batch has one, else every id), summed over the
  gradient-accumulation micro-batches, times ``args.world_size``: the job's tokens when every replica's batch
  holds as many (the replicas are not asked; with padding they differ a little, and with tensor or sequence
  parallelism the replicas share a batch: pass ``tokens_fn``). The Trainer hands its callbacks no batch, so
  the callback counts them in a forward pre-hook on the model, on the forwards made in training mode.
  ``lr``: the learning rate the optimizer stepped with. ``loss`` and ``grad_norm``: the Trainer's logged
  values, on the steps it logs at (``logging_steps``; 1 gives every step's loss): the logged loss is the mean
  over the steps since the last log, as the Trainer logs it; a loss logged at an epoch's end
  (``logging_strategy="epoch"``) comes after that step was sent and is left out. The step after a checkpoint
  save carries the save's time and is marked ``warmup``, so steady state leaves it out.
- ``phase("eval")`` from the first evaluation forward (or prediction step) until ``on_evaluate`` /
  ``on_predict``, then back to where it was ("measuring" once a step was sent).

A step is sent once the step's token count is read, which waits for the device (one host sync per optimizer
step): the host-clock step times are then the device's. Each rank sends its own events; only rank 0's tokens
count (btune's rule under torchrun).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import btune
from btune.integrations._common import as_float, batch_tokens, device_facts, module_precision, param_count, total

__all__ = ["BtuneCallback"]


class BtuneCallback(TrainerCallback):
    """Reports the Trainer's optimizer steps, evaluations and model facts to btune (the module's docstring says
    what and how). ``flops_per_token``: overrides 6 × n_params; ``n_params``: overrides the count;
    ``model_name``: overrides the config's name; ``tokens_fn(inputs)``: one micro-batch's tokens (``inputs`` as
    the model's forward gets them, a dict)."""

    def __init__(self, flops_per_token: float | None = None, n_params: int | None = None,
                 model_name: str | None = None, tokens_fn: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.n_params = n_params
        self.model_name = model_name
        self.tokens_fn = tokens_fn
        self._model: Any = None  #: the model the hook is on (under DDP, FSDP, DeepSpeed, compile: the inner one)
        self._model_params: int | None = None  #: its parameters, counted when it was first seen
        self._hook: Any = None
        self._training = False
        self._counts: list[Any] = []  #: this optimizer step's micro-batch token counts (ints or device tensors)
        self._pending: dict[str, Any] | None = None  #: a step waiting for its logged loss
        self._pending_step = -1
        self._lr: float | None = None
        self._after_save = False
        self._eval: Any = None  #: the open ``btune.phase("eval")``
        self._sent = False  #: whether a step was sent

    # -- the forward pre-hook: tokens of training forwards, the start of an evaluation ------------------------
    def _install(self, model: Any) -> None:
        """Hook ``model`` (the model inside a wrapper); its parameters are counted the first time it is seen, at
        the Trainer's init, before FSDP or DeepSpeed shard them."""
        model = _unwrap(model)
        if model is None or model is self._model or not isinstance(model, torch.nn.Module):
            return
        if self._hook is not None:
            self._hook.remove()
        self._model = model
        self._model_params = param_count(model)
        self._hook = model.register_forward_pre_hook(_eager(self._pre_forward), with_kwargs=True)

    def _pre_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            self._enter_eval()
        elif self._training:
            inputs = kwargs if kwargs or not args else {"input_ids": args[0], **kwargs}
            self._counts.append(self.tokens_fn(inputs) if self.tokens_fn is not None else batch_tokens(inputs))

    # -- sending ---------------------------------------------------------------------------------------------
    def _flush(self, loss: Any = None, grad_norm: Any = None) -> None:
        """Send the pending step (with the logged loss and grad norm, when they came)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        metrics = {k: v for k, v in pending.items() if v is not None}
        loss = as_float(loss)
        grad_norm = as_float(grad_norm)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        btune.step(loss=loss, **metrics)
        self._sent = True

    def _enter_eval(self) -> None:
        if self._eval is None:
            self._flush()
            self._eval = btune.phase("eval")

    def _exit_eval(self) -> None:
        ctx, self._eval = self._eval, None
        if ctx is None:
            return
        ctx.__exit__(None, None, None)  # back to "starting" before the first step, else "measuring"

    # -- the Trainer's events ----------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._install(kwargs.get("model"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._install(kwargs.get("model"))
        self._training = True
        self._counts.clear()
        self._pending = None
        model = self._model
        n = self.n_params if self.n_params is not None else self._model_params
        config = getattr(model, "config", None)
        facts: dict[str, Any] = {
            "framework": "transformers", "transformers_version": transformers.__version__,
            "model": (self.model_name or getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
                      or (type(model).__name__ if model is not None else None)),
            "n_params": n,
            "flops_per_token": self.flops_per_token if self.flops_per_token is not None else 6 * n if n else None,
            "n_devices": max(int(args.world_size), 1),
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else module_precision(model),
            "tokens": "global",
            **device_facts(args.device),
        }
        btune.meta(**{k: v for k, v in facts.items() if v is not None})

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._flush()
        self._exit_eval()  # a forward in eval mode outside an evaluation (no on_evaluate follows) ends here

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None)
        self._lr = as_float(groups[0].get("lr")) if groups else None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._flush()
        tokens = total(self._counts)
        self._counts.clear()
        self._pending = {"tokens": None if tokens is None else tokens * max(int(args.world_size), 1),
                         "lr": self._lr, "warmup": True if self._after_save else None}
        self._pending_step = state.global_step
        self._after_save = False
        if not control.should_log:  # DefaultFlowCallback, ahead of this one, has decided by now
            self._flush()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self._pending is not None and self._pending_step == state.global_step:
            self._flush(logs["loss"], logs.get("grad_norm"))

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        self._enter_eval()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._exit_eval()

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   **kwargs: Any) -> None:
        self._exit_eval()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        self._flush()
        self._after_save = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._flush()
        self._exit_eval()
        self._training = False
        self._counts.clear()


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` kept out of torch.compile's graphs (it reports to btune), where this torch can say so."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


#: Wrappers the Trainer (through accelerate) may put around the model: the model is their ``.module``
#: (``._orig_mod`` for torch.compile's).
_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
                       "PipelineEngine", "OptimizedModule"})


def _unwrap(model: Any) -> Any:
    """The model inside DDP, FSDP, DeepSpeed's engine or torch.compile's module."""
    for _ in range(8):
        if type(model).__name__ not in _WRAPPERS:
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model
