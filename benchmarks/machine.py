"""What machine a benchmark ran on, recorded beside its numbers: ratios against a peer move
between machines of the same kind (docs/quantization.md, caption speed on two machines)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# The instruction-set extensions that decide which kernels ORT and PyTorch pick on x86 / ARM.
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
          "asimd", "asimddp", "i8mm", "sve")


def machine_info() -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model is None:
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(), "isa": [f for f in _FLAGS if f in flags],
            "date": time.strftime("%Y-%m-%d")}


def describe(info: dict) -> str:
    return f"{info['cpu']}, {info['cores']} cores, {' '.join(info['isa']) or 'no listed ISA extensions'}"


if __name__ == "__main__":
    print(describe(machine_info()))
