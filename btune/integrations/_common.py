"""What the framework callbacks share: a batch's token count, parameter count, precision and device facts.

torch is imported inside the functions (the callbacks' modules have imported it already by then).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: torch dtype names as btune's records write a precision.
_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def batch_tokens(batch: Any) -> Any:
    """One batch's tokens, or None when it holds no tokens this can see: a mapping with ``input_ids`` counts the
    non-padding tokens (the sum of a 2-D ``attention_mask`` of the same shape; without one, every id); a tensor,
    or a tuple or list whose first item is a tensor, counts its elements. The count may be a 0-d tensor still on
    the device (no sync here): ``total`` turns the counts into an int."""
    import torch

    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return None
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            return mask.sum()
        return ids.numel()
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return None


def total(counts: list[Any]) -> int | None:
    """The sum of token counts (ints or 0-d tensors) as an int (one host sync when a count is on a device);
    None when there is none."""
    if not counts:
        return None
    return int(sum(counts))


def param_count(module: Any) -> int:
    """The module's parameters, each counted once (DeepSpeed ZeRO-3's partitioned ones by their full size)."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in module.parameters())


def precision_of(dtype: Any) -> str | None:
    """A torch dtype as a record's precision ("bf16", "fp16", "fp32"), or None."""
    return _PRECISION.get(str(dtype).rpartition(".")[2])


def module_precision(module: Any) -> str | None:
    """A module's precision: of its ``dtype`` attribute, else of its first floating-point parameter; or None."""
    dtype = getattr(module, "dtype", None)
    if dtype is None and module is not None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return precision_of(dtype)


def device_facts(device: Any) -> dict[str, Any]:
    """``device``, ``device_name`` and ``device_uuid`` (NVML's form, so the console charges this GPU's energy to
    the run) of a torch device, as btune's own workloads report them."""
    import torch

    device = torch.device(device)
    facts: dict[str, Any] = {"device": str(device), "device_name": "cpu" if device.type == "cpu" else device.type}
    if device.type == "cuda":
        try:
            facts["device_name"] = torch.cuda.get_device_name(device)
            uuid = str(torch.cuda.get_device_properties(device).uuid).strip()
            if uuid:
                facts["device_uuid"] = uuid if uuid.upper().startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        except Exception:  # no device to ask, or a torch without .uuid: the console falls back
            pass
    return facts


def as_float(value: Any) -> float | None:
    """A loss or a learning rate (a number or a one-element tensor) as a float, or None."""
    if value is None:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
