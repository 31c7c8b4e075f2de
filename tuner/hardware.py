"""Peak dense throughput per device, keyed by the exact name the driver reports, and MFU."""

from __future__ import annotations

#: Dense bf16 peak TFLOP/s (no sparsity) by exact device name (``torch.cuda.get_device_name``/NVML).
BF16_PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100": 989.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
}
#: Devices whose FP8 tensor cores run at twice the bf16 rate.
FP8_CAPABLE = frozenset(n for n in BF16_PEAK_TFLOPS if "A100" not in n)


def peak_tflops(device_name: str | None, precision: str = "bf16") -> tuple[float | None, str | None]:
    """(peak TFLOP/s, None) for a known device, or (None, reason) when MFU cannot be honest."""
    if not device_name:
        return None, "no device name recorded"
    if device_name.lower() == "cpu" or device_name.startswith("cpu"):
        return None, "CPU: no peak FLOP/s table for CPUs"
    base = BF16_PEAK_TFLOPS.get(device_name)
    if base is None:
        return None, f"unknown device {device_name!r}: no peak in the table"
    if precision == "fp8":
        if device_name not in FP8_CAPABLE:
            return None, f"{device_name} has no FP8 tensor cores"
        return base * 2, None
    return base, None


def mfu(achieved_flops_per_s: float | None, device_name: str | None, precision: str = "bf16",
        n_devices: int = 1) -> dict:
    """``{"value", "peak_tflops", "reason"}``: achieved FLOP/s over ``n_devices`` times one device's peak."""
    peak, reason = peak_tflops(device_name, precision)
    if peak is None or achieved_flops_per_s is None:
        return {"value": None, "peak_tflops": peak, "reason": reason or "no achieved FLOP/s"}
    return {"value": achieved_flops_per_s / (peak * 1e12 * max(1, n_devices)), "peak_tflops": peak, "reason": None}
