"""Kahneman-Tversky Optimization (KTO) with LoRA / QLoRA or in full on single labelled replies.

Takes prompt/completion/label rows, or preference pairs (the original README trains KTO on
`train_prefs`), which are unpaired: each pair gives a desirable and an undesirable row.

    tunefleet train --method kto --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --eval_split test_prefs \
      --output_dir runs/kto_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
"""

from trl import KTOConfig, KTOTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily

from tunefleet.trainers import callbacks, data, life_cycle, model, run_folder, speed, trainer_args
from tunefleet.trainers.config import TrainConfig


def train(cfg: TrainConfig):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run_folder.prepare_output_dir(cfg)

    # ---- data: prompt / completion / label (preference pairs unpaired)
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (group-by-length, attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model (quantized for --finetune qlora)
    tokenizer = model.run_tokenizer(cfg)
    base = model.load_model(cfg, fast.attn_implementation.on)

    # ---- trainer
    args = trainer_args.trl_config(
        KTOConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        max_length=cfg.max_length,
        beta=cfg.beta_value,
        **({"loss_type": cfg.loss_type[0]} if cfg.loss_type else {}),
    )
    trainer = KTOTrainer(
        model=base,
        ref_model=None,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=evaluation and evaluation.dataset,
        processing_class=tokenizer,
        peft_config=model.lora_config(cfg),
        callbacks=[callbacks.progress_callback(folder)],
    )

    # ---- train, save the documented layout, record run.json
    return life_cycle.train_and_save(
        trainer, cfg, folder, resume_from, train, evaluation, extra={"fast_path": fast.record()}
    )
