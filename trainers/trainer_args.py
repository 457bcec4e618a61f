"""What a run's config becomes for TRL: the trainer's arguments (TRL's own config class, every field it has),
the choices decided elsewhere (speed, memory), and the length-grouped order of the training data."""

from __future__ import annotations

import os
import typing
from typing import TYPE_CHECKING

from tunefleet.common import schema, tracking
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.trainers import trl_fields
from tunefleet.trainers.callbacks import lengths_as_list_callback
from tunefleet.trainers.run_folder import RunFolder, run_name
from tunefleet.trainers.speed import FastPath

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory all-reduce (`deepspeed_shm_comm`, 30-70 s of g++ in
    every new environment: a fresh venv, node image or CI clone) when its communication backend starts. Only its
    tensor-parallel inference uses that op; training reduces through torch.distributed (gloo) either way. Marked
    unavailable in DeepSpeed's table of compatible ops (probed once per process, kept for edits like this one),
    DeepSpeed goes on without it, as it does where the op cannot build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def training_args(cfg: TrainConfig, folder: RunFolder, dtype, fast: FastPath) -> dict:
    """TrainingArguments shared by all five TRL configs (`fast`: speed choices)."""
    import torch

    on = {k: v.on for k, v in vars(fast).items()}
    evaluate = cfg.evaluates
    deepspeed_on_cpu = (
        not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )
    if deepspeed_on_cpu:
        skip_deepspeed_shm_build()
    return dict(
        output_dir=str(folder.local),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(cfg.eval_steps or cfg.logging_steps) if evaluate else None,
        report_to=tracking.parse_report_to(cfg.report_to),
        run_name=run_name(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        # On CPU: use_cpu, or TRL resolves bf16=True and fails; but not under DeepSpeed, which accelerate then
        # ignores (DeepSpeed runs on CPU through its own CPU accelerator and gloo).
        use_cpu=not torch.cuda.is_available() and not deepspeed_on_cpu,
        ddp_backend="gloo" if deepspeed_on_cpu else None,  # without it accelerate forms no world (size 1)
        activation_checkpointing=on["gradient_checkpointing"],  # TRL's configs default to on
        disable_tqdm=True,  # progress_callback draws the bar (and prints one line per log off a terminal)
        ddp_find_unused_parameters=False,
        **(
            {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
            if on.get("group_by_length")
            else {}
        ),
        **({"use_liger_kernel": True} if on.get("use_liger_kernel") else {}),
        **({"tf32": True} if on.get("tf32") else {}),
    )


# tunefleet settings named as TRL's that tunefleet turns into another TRL option (`activation_checkpointing`).
DECIDED_ELSEWHERE = ("gradient_checkpointing",)


def trl_config(config_class, cfg: TrainConfig, **values):
    """The method's TRL config: tunefleet's choices (`values`), every tunefleet setting that TRL's class has under
    the same name, then every TRL option the run was given (`cfg.trl_args`, which win). TRL's own checks
    (`__post_init__`) run here: a value TRL refuses is one line with TRL's message."""
    import dataclasses

    own = {f.name for f in dataclasses.fields(config_class) if f.init}
    args = dict(values)
    for name in own.intersection(schema.fields(type(cfg))) - set(args) - set(DECIDED_ELSEWHERE):
        value = getattr(cfg, name)
        if value is not None:
            args[name] = value
    args.update({k: v for k, v in cfg.trl_args.items() if k in own})
    hints = typing.get_type_hints(config_class)
    for name, value in args.items():
        if isinstance(value, list) and len(value) == 1 and "list" not in trl_fields.type_forms(hints[name])[0]:
            args[name] = value[0]  # one name given as tunefleet's list (loss_type) where this class takes one
    try:
        return config_class(**args)
    except (ValueError, TypeError) as exc:
        raise TunefleetError(f"TRL's {config_class.__name__} refused the settings: {first_line(exc)}") from None


def group_by_token_length(trainer) -> None:
    """Give the tokenized train (and eval) set a `length` column for length-grouped batches.

    TRL's preference trainers tokenize into prompt/chosen/rejected id columns, and the HF sampler only infers
    lengths from `input_ids`; the column must also survive the trainer's unused-column removal. transformers
    groups the eval set by length too once the train set is, so it needs the column as well. Lengths are counted
    by arrow over whole columns (a row at a time took ~0.1 ms per row)."""
    if trainer.train_dataset is None or "length" in trainer.train_dataset.column_names:
        return
    with_lengths = with_token_lengths(trainer.train_dataset)
    if with_lengths is None:
        return
    trainer.train_dataset = with_lengths
    if trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = with_token_lengths(trainer.eval_dataset) or trainer.eval_dataset
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, "length"]
    trainer.add_callback(lengths_as_list_callback())


def with_token_lengths(ds):
    """The dataset with a `length` column (prompt ids plus the longest reply's), or None without id columns."""
    import pyarrow.compute as pc

    if "length" in ds.column_names:
        return ds
    id_cols = [c for c in ds.column_names if c.endswith("_ids") and "attention" not in c and "labels" not in c]
    if not id_cols:
        return None
    prompt = [c for c in id_cols if c.startswith("prompt")]
    replies = [c for c in id_cols if c not in prompt]
    table = ds.select_columns(id_cols).with_format("arrow")[:]
    counts = {c: pc.fill_null(pc.call_function("list_value_length", [table[c]]), 0).to_numpy() for c in id_cols}
    lengths = sum(counts[c] for c in prompt) + max_of([counts[c] for c in replies])
    return ds.add_column("length", [int(n) for n in lengths])


def max_of(arrays: list):
    import numpy as np

    return np.maximum.reduce(arrays) if len(arrays) > 1 else arrays[0]
