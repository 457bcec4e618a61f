"""Reward modelling with LoRA / QLoRA or in full on preference pairs: a sequence classifier with one output, trained (TRL's
RewardTrainer, Bradley-Terry loss) to score the chosen reply above the rejected one.

LoRA adapts the base's linear layers; the score head is new and trained in full (saved with the adapter). Its
evaluation during training is pair accuracy (`eval_accuracy`); `tunefleet export` writes a plain sequence
classifier that GRPO's --reward_funcs and the evaluator's --reward_model load.

    tunefleet train --method rm --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --eval_split test_prefs \
      --output_dir runs/rm_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
    tunefleet train --method rm --model_name tunefleet/tiny-qwen2 --dataset tunefleet/tiny-ultrafeedback \
      --split train_prefs --output_dir runs/rm_tiny --max_steps 40 --learning_rate 1e-3
"""

from trl import RewardConfig, RewardTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily

from tunefleet.trainers import callbacks, data, life_cycle, model, run_folder, speed, trainer_args
from tunefleet.trainers.config import TrainConfig


def train(cfg: TrainConfig):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run_folder.prepare_output_dir(cfg)

    # ---- data: any preference layout -> prompt / chosen / rejected (rows that cannot train dropped, counted)
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model with a score head (quantized for --finetune qlora)
    tokenizer = model.run_tokenizer(cfg)
    scorer = model.load_model(cfg, fast.attn_implementation.on, reward_model=True)
    scorer.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last real token

    # ---- trainer
    args = trainer_args.trl_config(
        RewardConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        max_length=cfg.max_length,
    )
    trainer = RewardTrainer(
        model=scorer,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=evaluation and evaluation.dataset,
        processing_class=tokenizer,
        peft_config=model.lora_config(cfg, reward_model=True),
        callbacks=[callbacks.progress_callback(folder)],
    )
    model.score_head_in(trainer.model, model.compute_dtype(cfg.bf16))

    # ---- train, save the documented layout, record run.json
    return life_cycle.train_and_save(
        trainer, cfg, folder, resume_from, train, evaluation, extra={"fast_path": fast.record()}
    )
