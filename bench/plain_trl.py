"""A hand-written TRL script with TRL's defaults: the baseline bench/train_throughput.py holds tunefleet against.

    python bench/plain_trl.py sft MODEL_DIR DATA.jsonl OUT_DIR [--epochs 1] [--max_steps N] [--batch 8] [--lr 2e-4]

Prints one JSON line: train_runtime, first_loss, peak_rss_mb (and peak_gpu_mb on a GPU).
Only what a plain script must set is set: LoRA (r 16, all linear), batch, lr, epochs, on CPU use_cpu and
bf16 off (TRL resolves bf16=True: an error on CPU, or slow bf16 autocast with use_cpu), no checkpoints, no
trackers. Everything else is TRL's default (gradient checkpointing on, random batch order, ...).
"""

import argparse
import json
import resource

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--qlora", action="store_true")
    a = p.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model)
    kwargs = {}
    if a.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    ds = load_dataset("json", data_files=a.data, split="train")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=a.out,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=42,
        disable_tqdm=True,
    )
    if not torch.cuda.is_available():
        # TRL resolves bf16=True; with use_cpu that is bf16 autocast on CPU, ~25x slower here. Every CPU user
        # turns it off, so the baseline does too (it would flatter tunefleet otherwise).
        common["bf16"] = False
    if a.method == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer
    elif a.method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    elif a.method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    elif a.method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    if a.method == "grpo":
        from tunefleet.trainers.rewards import friendly

        args = Config(**common, num_generations=4, max_completion_length=16)
        trainer = Trainer(
            model=model, reward_funcs=[friendly], args=args, train_dataset=ds, processing_class=tok, peft_config=lora
        )
    else:
        trainer = Trainer(model=model, args=Config(**common), train_dataset=ds, processing_class=tok, peft_config=lora)
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = {
        "train_runtime": result.metrics["train_runtime"],
        "first_loss": losses[0] if losses else None,
        "steps": trainer.state.global_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
