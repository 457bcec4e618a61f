"""Group Relative Policy Optimization (GRPO) with LoRA / QLoRA or in full: online rewards on sampled completions.

Rewards come from `--reward_funcs` (see trainers/rewards.py): built-in names, `module:function`, or a
reward-model path.

    tunefleet train --method grpo --model_name Qwen/Qwen2-0.5B-Instruct \
      --dataset HuggingFaceH4/ultrafeedback_binarized --split train_gen \
      --output_dir runs/grpo_qwen_0.5b --max_train_samples 1000 --reward_funcs length
    tunefleet train --method grpo --model_name tunefleet/tiny-qwen2 --dataset tunefleet/tiny-ultrafeedback \
      --split train_gen --output_dir runs/grpo_tiny --max_steps 4 --reward_funcs friendly answer
"""

from trl import GRPOConfig, GRPOTrainer  # pyright: ignore[reportPrivateImportUsage] - trl exports them lazily
from trl.trainer.grpo_trainer import RewardFunc

from tunefleet.trainers import callbacks, data, life_cycle, model, rewards, run_folder, speed, trainer_args
from tunefleet.trainers.config import TrainConfig

DEFAULT_COMPLETION_LENGTH = 64


def grpo_options(cfg: TrainConfig) -> dict:
    """The GRPOConfig options a user may set; None keeps TRL's default."""
    return {
        "temperature": cfg.temperature,
        "reward_weights": cfg.reward_weights,
        "scale_rewards": cfg.scale_rewards,
        "mask_truncated_completions": cfg.mask_truncated_completions or None,
        "loss_type": cfg.loss_type[0] if cfg.loss_type else None,
        "use_vllm": cfg.use_vllm or None,
        "vllm_mode": "colocate" if cfg.use_vllm else None,
    }


def train(cfg: TrainConfig):
    # ---- output folder (a folder or a URI): refuse a finished run, find a checkpoint to resume
    folder, resume_from = run_folder.prepare_output_dir(cfg)

    # ---- generation backend: vLLM (colocate) only where it can run
    if cfg.use_vllm:
        model.check_vllm()

    # ---- rewards first: a bad --reward_funcs fails before any loading
    reward_funcs: list[RewardFunc] = [
        rewards.guarded(spec, f) if callable(f) else f
        for spec, f in zip(cfg.reward_funcs, rewards.load(cfg.reward_funcs, cfg.trust_remote_code))
    ]

    # ---- data: prompts (strings become one user message); other columns go to the reward functions
    train = data.training_data(cfg)
    evaluation = data.evaluation_data(cfg)

    # ---- fast path (group-by-length, attention kernel, ...): chosen for this device, recorded in run.json
    fast = speed.detect(cfg)

    # ---- tokenizer and base model (quantized for --finetune qlora); prompts over --max_prompt_length dropped, counted
    tokenizer = model.run_tokenizer(cfg)
    if cfg.max_prompt_length:
        data.drop_long_prompts(train, tokenizer, cfg.max_prompt_length)
    base = model.load_model(cfg, fast.attn_implementation.on)

    # ---- trainer
    args = trainer_args.trl_config(
        GRPOConfig,
        cfg,
        **trainer_args.training_args(cfg, folder, model.compute_dtype(cfg.bf16), fast),
        beta=cfg.beta_value,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length or DEFAULT_COMPLETION_LENGTH,
        **{k: v for k, v in grpo_options(cfg).items() if v is not None},
    )
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=evaluation and evaluation.dataset,
        processing_class=tokenizer,
        peft_config=model.lora_config(cfg),
        callbacks=[callbacks.progress_callback(folder)],
    )

    # ---- train, save the documented layout, record run.json
    return life_cycle.train_and_save(
        trainer,
        cfg,
        folder,
        resume_from,
        train,
        evaluation,
        extra={
            "reward_funcs": cfg.reward_funcs,
            "fast_path": fast.record(),
            "generation": {
                k: getattr(args, k)
                for k in (
                    "temperature",
                    "num_generations",
                    "max_completion_length",
                    "scale_rewards",
                    "loss_type",
                    "reward_weights",
                    "beta",
                    "mask_truncated_completions",
                    "use_vllm",
                )
            },
        },
    )
