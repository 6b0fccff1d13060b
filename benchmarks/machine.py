"""The machine line every benchmark prints first (run the scripts as ``python benchmarks/NAME.py``)."""

import os
import platform


def machine() -> str:
    """``machine: <cpu>, <n> CPUs, torch <version>, <n> threads``."""
    import torch

    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
