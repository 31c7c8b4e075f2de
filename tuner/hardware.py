"""Peak dense throughput and HBM bandwidth per device, keyed by the exact name the driver reports; MFU, MBU."""

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


#: Peak HBM bandwidth, TB/s (10^12 bytes/s), by exact device name, from the vendors' data sheets.
HBM_PEAK_TBPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 3.35,  # H100 SXM
    "NVIDIA H100": 3.35,
    "NVIDIA H100 NVL": 3.9,
    "NVIDIA H100 PCIe": 2.0,
    "NVIDIA H200": 4.8,
    "NVIDIA H200 NVL": 4.8,
    "NVIDIA B200": 8.0,
    "NVIDIA A100-SXM4-80GB": 2.039,
    "NVIDIA A100 80GB PCIe": 1.935,
    "NVIDIA A100-SXM4-40GB": 1.555,
    "NVIDIA A100-PCIE-40GB": 1.555,
    "NVIDIA L40S": 0.864,
}


def peak_bandwidth(device_name: str | None) -> tuple[float | None, str | None]:
    """(peak HBM TB/s, None) for a known device, or (None, reason) when MBU cannot be honest."""
    if not device_name:
        return None, "no device name recorded"
    if device_name.lower().startswith("cpu"):
        return None, "CPU: no peak memory bandwidth table for CPUs"
    peak = HBM_PEAK_TBPS.get(device_name)
    if peak is None:
        return None, f"unknown device {device_name!r}: no peak HBM bandwidth in the table"
    return peak, None


def mbu(achieved_bytes_per_s: float | None, device_name: str | None, n_devices: int = 1,
        reason: str | None = None) -> dict:
    """``{"value", "achieved_tb_s", "peak_tb_s", "reason"}``: bytes moved per second over ``n_devices`` times
    one device's peak HBM bandwidth (``reason``: why no bytes were counted)."""
    peak, why = peak_bandwidth(device_name)
    achieved = achieved_bytes_per_s / 1e12 if achieved_bytes_per_s is not None else None
    if peak is None or achieved is None:
        return {"value": None, "achieved_tb_s": achieved, "peak_tb_s": peak,
                "reason": why or reason or "no bytes per step recorded"}
    return {"value": achieved / (peak * max(1, n_devices)), "achieved_tb_s": achieved, "peak_tb_s": peak,
            "reason": None}
