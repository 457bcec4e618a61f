"""A calm terminal: library progress bars off, known noise off, the remaining library warnings once each.

`--verbose` (train) leaves every library as it is. What is turned off, and why:
- the "Loading weights" / "Writing model shards" bars of transformers, the hub's download bars and the datasets'
  map bars: tunefleet draws one bar per run (trainers.callbacks.progress_callback) and prints one line per data step;
- DeepSpeed's "Setting accelerator to CPU" warning, printed on every import on a host without a GPU: on such a
  host tunefleet names the CPU accelerator itself (DS_ACCELERATOR=cpu, what DeepSpeed would pick);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": a hint that an optional faster CPU
  kernel package is missing, printed by every process that loads a 4-bit model on CPU.
Every other warning still shows, once per message (FutureWarnings of the libraries calling each other included).
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def calm(verbose: bool = False) -> None:
    """Call once at the start of a process, before the ML libraries are imported."""
    if verbose:
        return
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=UserWarning)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def closed_pipe() -> int:
    """stdout's reader went away (`tunefleet ... | head`): end quietly with the exit code of a tool that SIGPIPE
    ended (128 + 13), as `ls | head` does. Python ignores SIGPIPE and raises BrokenPipeError instead; restoring the
    signal's default would also kill a sweep whose Ray or object-store socket closes, so it is caught here."""
    import signal
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush at exit must not fail again
    return 128 + signal.SIGPIPE
