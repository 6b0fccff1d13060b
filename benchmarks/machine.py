"""The machine line every benchmark prints first (run the scripts as ``python benchmarks/NAME.py``)."""

import os
import platform


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def machine() -> str:
    """``machine: <cpu>, <n> CPUs, torch <version>, <n> threads``."""
    import torch

    return (f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
