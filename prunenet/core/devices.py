"""Torch devices: resolve what the user asked for, describe where a number was measured."""

from __future__ import annotations

import os
import platform

import torch
from torch import nn

from prunenet.errors import PruneNetError


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a clear error (never assume a GPU)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise PruneNetError(f"Unknown device {name!r} ({error}); use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneNetError(
            f"--device {name} was requested but this torch build sees no CUDA GPU "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --device cpu, "
            "or install a CUDA build of torch on a machine with an NVIDIA GPU."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PruneNetError(f"--device {name} was requested but MPS is not available here.")
    return device


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_device() -> str:
    """The accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def describe_device(device: torch.device | str) -> str:
    """'cpu (x86_64, 2 logical cores)' or the GPU's name: what a timing was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} logical cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
