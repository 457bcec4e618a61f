"""Direct Preference Optimization (DPO) with LoRA / QLoRA or in full on preference pairs.

The reference model is the base with the adapter disabled (no second copy in memory).

    tunefleet train --method dpo --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --eval_split test_prefs \
      --output_dir runs/dpo_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
    tunefleet train --method dpo --model_name tunefleet/tiny-qwen2 --dataset tunefleet/tiny-ultrafeedback \
      --split train_prefs --output_dir runs/dpo_tiny --max_steps 20 --learning_rate 1e-3
"""

from trl import DPOConfig, DPOTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily

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
        DPOConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        max_length=cfg.max_length,
        beta=cfg.beta_value,
        **({"loss_type": cfg.loss_type, "loss_weights": cfg.loss_weights} if cfg.loss_type else {}),
    )
    trainer = DPOTrainer(
        model=base,
        ref_model=None,
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
