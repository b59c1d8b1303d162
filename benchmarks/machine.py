"""The machine a benchmark ran on: printed beside the figures, since ratios still vary by CPU."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import torchao
import torchvision

# The ISA flags that decide which int8 kernels Inductor and oneDNN can use.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def machine_info() -> dict:
    """CPU model, usable cores, ISA flags that matter for int8, versions, date and load."""
    cpu_model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model is None:
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: the model from `platform`, no flags
    return {
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "cpu_flags": [f for f in INT8_FLAGS if f in flags],
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchao": torchao.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
    }
