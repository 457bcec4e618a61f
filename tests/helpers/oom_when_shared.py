"""A GRPO reward that runs out of GPU memory while its run shares a GPU (the placement tunefleet gave the run says
so), the way a packed run dies when its neighbours leave it too little: the sweep must retry it alone."""

import json
import os

import torch


def reward(completions, **kwargs):
    placement = json.loads(os.environ.get("TUNEFLEET_PLACEMENT") or "{}")
    if placement.get("gpus", 1) < 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (packed with another run)")
    return [1.0 for _ in completions]
