"""What a run cost (run.json `cost`): wall time, GPU-seconds, tokens trained and their rate, peak memory, and on
GPUs the energy NVML measured. A resumed run adds each attempt's figures to the earlier attempts'.

- wall_seconds: from the launcher starting the process (or the process's own start) to the record.
- train_seconds: time inside `trainer.train()`; tokens_per_second is tokens_trained over it.
- gpu_seconds: the GPUs the run holds (its share of one GPU, or its whole GPUs, on each node) times wall_seconds;
  0 on CPU.
- tokens_trained: the tokens of every training batch that are not padding, on every rank (a preference pair's
  prompt and both replies; GRPO's prompts and sampled completions), counted as each batch reaches the loss.
- energy_joules: NVML's energy counter of each process's GPU over the attempt, times the run's share of it, summed
  over ranks. Absent (not zero) where there is no NVML.
"""

from __future__ import annotations

import time
from typing import Any

from tunefleet.trainers import memory
from tunefleet.trainers.callbacks import process_started_at

ADDED = ("wall_seconds", "train_seconds", "gpu_seconds", "tokens_trained", "energy_joules")


def tokens_in_batch(inputs: Any) -> int:
    """Tokens that are not padding in one training batch, whatever the method's collator names them: every
    `*attention_mask*` (SFT, DPO, KTO, reward models), else every `*_mask` (GRPO's prompt and completion masks),
    else the size of `input_ids`."""
    if not isinstance(inputs, dict):
        return 0
    masks = [v for k, v in inputs.items() if "attention_mask" in k and hasattr(v, "sum")]
    if not masks:
        masks = [v for k, v in inputs.items() if k.endswith("_mask") and hasattr(v, "sum")]
    if masks:
        return int(sum(int(m.sum().item()) for m in masks))
    ids = inputs.get("input_ids")
    return int(ids.numel()) if ids is not None and hasattr(ids, "numel") else 0


class EnergyCounter:
    """NVML's total-energy counter of this process's GPU (millijoules since the driver loaded)."""

    def __init__(self) -> None:
        self.handle = None
        self.start: float | None = None
        try:
            import pynvml
            import torch

            if not torch.cuda.is_available():
                return
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self.start = self.read()
        except Exception:  # no NVML library, no driver, or a GPU without an energy counter: energy is absent
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0

    def joules(self) -> float | None:
        """Energy since the counter was started; None without one, or if NVML stops answering (the run's record
        must not fail over its energy)."""
        if self.start is None:
            return None
        try:
            now = self.read()
        except Exception:
            return None
        return None if now is None else now - self.start


class CostMeter:
    """Counts a run's tokens as its batches reach the model and its time; `record()` is run.json's `cost`."""

    def __init__(self, trainer, before: dict | None = None) -> None:
        self.before = before or {}
        self.tokens = 0
        self.train_started: float | None = None
        self.train_ended: float | None = None
        self.energy = EnergyCounter()
        self.trainer = trainer
        # compute_loss sees each micro-batch as the model gets it (GRPO's: after its completions are sampled);
        # evaluation calls it too, with the model in eval mode, and is not counted.
        loss = trainer.compute_loss

        def counted_loss(model, inputs, *args, **kwargs):
            if model.training:
                self.tokens += tokens_in_batch(inputs)
            return loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counted_loss

    def training(self):
        """A context for `trainer.train()`: its time is train_seconds."""
        meter = self

        class Timed:
            def __enter__(self):
                meter.train_started = time.time()

            def __exit__(self, *exc):
                meter.train_ended = time.time()

        return Timed()

    def record(self, num_nodes: int = 1, gather: bool = True) -> dict:
        """This attempt's cost plus the earlier attempts'. `gather`: sum tokens and energy over the ranks (a
        collective: every rank calls it; off where a rank may be gone)."""
        import torch

        tokens, energy = float(self.tokens), self.energy.joules()
        share = memory.gpu_share()
        accelerator = self.trainer.accelerator
        if gather and accelerator.num_processes > 1:
            summed = accelerator.reduce(
                torch.tensor([tokens, energy or 0.0, 1.0 if energy is not None else 0.0], device=accelerator.device),
                reduction="sum",
            )
            tokens, energy = float(summed[0]), float(summed[1]) if summed[2] > 0 else None
        now = time.time()
        train_seconds = (self.train_ended or now) - self.train_started if self.train_started else 0.0
        placement = memory.launched_placement()
        if placement and placement.get("gpus"):
            gpus = float(placement["gpus"]) * num_nodes  # the launcher's reservation, on each node
        elif torch.cuda.is_available():
            gpus = float(accelerator.num_processes)  # started by hand: a device per process
        else:
            gpus = 0.0
        wall = now - process_started_at()
        attempt = {
            "wall_seconds": wall,
            "train_seconds": train_seconds,
            "gpu_seconds": gpus * wall,
            "tokens_trained": tokens,
            "energy_joules": energy * share if energy is not None else None,
        }
        out: dict[str, Any] = {}
        for key in ADDED:
            values = [v for v in (self.before.get(key), attempt[key]) if isinstance(v, (int, float))]
            if values:
                out[key] = round(sum(values), 3)
        out["tokens_trained"] = int(out.get("tokens_trained", 0))
        out["tokens_per_second"] = (
            round(out["tokens_trained"] / out["train_seconds"], 1) if out["train_seconds"] else None
        )
        out["gpus"] = gpus
        out["attempts"] = int(self.before.get("attempts", 0)) + 1
        peak = self.peak_memory_mb()
        out |= {k: max(v, self.before.get(k) or 0.0) for k, v in peak.items()}
        return out

    @staticmethod
    def peak_memory_mb() -> dict[str, float]:
        from tunefleet.trainers.run_record import peak_memory

        return {k: v for k, v in peak_memory().items() if k in ("peak_rss_mb", "peak_gpu_mb")}


def add_up(costs: list[dict]) -> dict[str, Any]:
    """Runs' costs (run.json `cost`) added up: a study's or a sweep's total. Energy is None where no run measured
    it (no NVML), not zero."""
    energy = [c["energy_joules"] for c in costs if isinstance(c.get("energy_joules"), (int, float))]
    return {
        "wall_seconds": sum(c.get("wall_seconds") or 0.0 for c in costs),
        "gpu_seconds": sum(c.get("gpu_seconds") or 0.0 for c in costs),
        "tokens_trained": int(sum(c.get("tokens_trained") or 0 for c in costs)),
        "energy_joules": sum(energy) if energy else None,
    }
