"""Supervised fine-tuning (SFT) with LoRA / QLoRA or in full on conversations.

    tunefleet train --method sft --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_sft --eval_split test_sft \
      --output_dir runs/sft_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
    tunefleet train --method sft --model_name tunefleet/tiny-qwen2 --dataset tunefleet/tiny-ultrafeedback \
      --split train_sft --output_dir runs/sft_tiny --max_steps 20      # offline, CPU
"""

from trl import SFTConfig, SFTTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily

from tunefleet.trainers import callbacks, data, life_cycle, model, run_folder, speed, trainer_args
from tunefleet.trainers.config import TrainConfig


def train(cfg: TrainConfig):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run_folder.prepare_output_dir(cfg)

    # ---- data: any SFT layout (messages, ShareGPT, Alpaca, prompt/completion, text) -> TRL's columns
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (group-by-length, attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model (quantized for --finetune qlora)
    tokenizer = model.run_tokenizer(cfg)
    if cfg.assistant_only_loss:
        model.check_assistant_masks(tokenizer, cfg.model_name, train.dataset)
    base = model.load_model(cfg, fast.attn_implementation.on)

    # ---- trainer
    args = trainer_args.trl_config(
        SFTConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        padding_free=fast.padding_free.on,
        assistant_only_loss=cfg.assistant_only_loss,
        # padding-free without packing cannot truncate: TRL wants max_length unset then
        max_length=None if fast.padding_free.on else cfg.max_length,
    )
    trainer = SFTTrainer(
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
