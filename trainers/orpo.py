"""Odds Ratio Preference Optimization (ORPO) with LoRA / QLoRA or in full: SFT and preference in one loss, no reference.

ORPO lives in `trl.experimental.orpo` in TRL 1.x. `--beta` is ORPO's lambda.

    tunefleet train --method orpo --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --eval_split test_prefs \
      --output_dir runs/orpo_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
"""

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tunefleet.trainers import callbacks, data, life_cycle, model, run_folder, speed, trainer_args
from tunefleet.trainers.config import TrainConfig


def train(cfg: TrainConfig):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run_folder.prepare_output_dir(cfg)

    # ---- data: any preference layout -> prompt / chosen / rejected (rows that cannot train dropped, counted)
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (group-by-length, attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model (quantized for --finetune qlora)
    tokenizer = model.run_tokenizer(cfg)
    base = model.load_model(cfg, fast.attn_implementation.on)

    # ---- trainer
    args = trainer_args.trl_config(
        ORPOConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        max_length=cfg.max_length,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.beta_value,
    )
    trainer = ORPOTrainer(
        model=base,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=evaluation and evaluation.dataset,
        processing_class=tokenizer,
        peft_config=model.lora_config(cfg),
        callbacks=[callbacks.progress_callback(folder)],
    )
    if fast.group_by_length.on:
        trainer_args.group_by_token_length(trainer)

    # ---- train, save the documented layout, record run.json
    return life_cycle.train_and_save(
        trainer, cfg, folder, resume_from, train, evaluation, extra={"fast_path": fast.record()}
    )
