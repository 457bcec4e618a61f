"""Kahneman-Tversky Optimization (KTO) with LoRA / QLoRA on single labelled replies.

Takes prompt/completion/label rows, or preference pairs (the original README trains KTO on
`train_prefs`), which are unpaired: each pair gives a desirable and an undesirable row.

    tunefleet train --method kto --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --eval_split test_prefs \
      --output_dir runs/kto_qwen_0.5b --max_train_samples 1000 --max_eval_samples 100
"""

from trl import KTOConfig, KTOTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily

from tunefleet.trainers import data, model, run, speed


def train(cfg):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run.prepare_output_dir(cfg)

    # ---- data: prompt / completion / label (preference pairs unpaired)
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (group-by-length, attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model (4-bit when --use_qlora)
    tokenizer = model.load_tokenizer(cfg.model_name, cfg.trust_remote_code)
    base = model.load_model(
        cfg.model_name,
        cfg.use_qlora,
        cfg.bf16,
        cfg.trust_remote_code,
        fast.attn_implementation.on,
    )

    # ---- trainer
    args = KTOConfig(
        **run.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
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
        peft_config=model.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout),
        callbacks=[run.progress_callback(folder)],
    )

    # ---- train, save the documented layout, record run.json
    return run.train_and_save(trainer, cfg, folder, resume_from, train, evaluation, extra={"fast_path": fast.record()})
