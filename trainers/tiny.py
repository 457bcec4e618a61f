"""The embedded offline default: `tunefleet/tiny-qwen2` and `tunefleet/tiny-ultrafeedback`.

Neither name needs a network. The dataset is bundled as package data (``trainers/assets/tiny-ultrafeedback``,
made by ``python -m tunefleet.trainers.tiny --write-data``); the model is built deterministically on first use into
``$TUNEFLEET_CACHE`` (default ``~/.cache/tunefleet``): a random-init Qwen2 model of ~0.4M parameters and
a byte-level BPE tokenizer trained on the bundled data with Qwen's own pre-tokenizer, so that
``AutoTokenizer`` reloads it with identical ids.

The data carries two rules a small model can pick up:
- style (preferences): the chosen reply opens friendly, the rejected one opens hostile, same answer;
- map (SFT): the answer depends on the prompt (animal -> its sound, thing -> its colour, a + b).

    python -m tunefleet.trainers.tiny --write-data   # regenerate the bundled files (deterministic)
    python -m tunefleet.trainers.tiny --build-model  # build the model now and print its path
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from importlib import resources
from pathlib import Path

TINY_MODEL = "tunefleet/tiny-qwen2"
TINY_DATASET = "tunefleet/tiny-ultrafeedback"
DATA_DIR = Path(str(resources.files("tunefleet.trainers").joinpath("assets", "tiny-ultrafeedback")))
SPLITS = {
    "train_prefs": 1200,
    "test_prefs": 200,
    "train_sft": 1200,
    "test_sft": 200,
    "train_gen": 300,
    "test_gen": 100,
}
MODEL_VERSION = "v1"  # bump when the architecture or tokenizer recipe changes: a new cache folder is built

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

FRIENDLY = ["Happy to help!", "Great question!", "Glad you asked!", "Sure thing, friend!", "With pleasure!"]
HOSTILE = ["Ugh, fine.", "Whatever.", "Stop asking me.", "Figure it out yourself.", "Not this again."]
ANIMALS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "lion": "roar",
    "frog": "ribbit",
    "horse": "neigh",
    "pig": "oink",
    "mouse": "squeak",
    "bee": "buzz",
}
THINGS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "a rose": "red",
}


def _qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        animal = rng.choice(sorted(ANIMALS))
        ask = rng.choice(["What sound does a {} make?", "How does a {} sound?", "Which noise does a {} make?"])
        return ask.format(animal), f"A {animal} says {ANIMALS[animal]}."
    if kind == 1:
        thing = rng.choice(sorted(THINGS))
        ask = rng.choice(["What color is {}?", "Which colour is {}?", "Tell me the color of {}."])
        return ask.format(thing), f"{thing[0].upper()}{thing[1:]} is {THINGS[thing]}."
    a, b = rng.randrange(10), rng.randrange(10)
    ask = rng.choice(["What is {} plus {}?", "Add {} and {}.", "How much is {} + {}?"])
    return ask.format(a, b), f"{a} plus {b} is {a + b}."


def make_rows(split: str, n: int) -> list[dict]:
    """Rows in the HuggingFaceH4/ultrafeedback_binarized schema, deterministic per split."""
    rng = random.Random(f"tunefleet-{split}")
    rows = []
    for _ in range(n):
        prompt, answer = _qa(rng)
        user = {"role": "user", "content": prompt}
        chosen = [user, {"role": "assistant", "content": f"{rng.choice(FRIENDLY)} {answer}"}]
        rejected = [user, {"role": "assistant", "content": f"{rng.choice(HOSTILE)} {answer}"}]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": float(rng.choice([8, 9, 10])),
                "score_rejected": float(rng.choice([1, 2, 3, 4])),
            }
        )
    return rows


def write_data(directory: Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in SPLITS.items():
        with open(directory / f"{split}.jsonl", "w") as fh:
            for row in make_rows(split, n):
                fh.write(json.dumps(row, sort_keys=True) + "\n")


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFLEET_CACHE", Path.home() / ".cache" / "tunefleet"))


def _corpus() -> list[str]:
    texts = []
    for split in ("train_prefs", "train_sft"):
        for row in make_rows(split, SPLITS[split]):
            texts += [m["content"] for m in row["chosen"] + row["rejected"][1:]]
    return texts + ["user", "assistant", "system", "\n"]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(
        models.BPE(
            unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
        )
    )
    # Qwen's exact pipeline: AutoTokenizer re-installs it on load, so training with another would shift ids.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_model(path: Path) -> Path:
    """Build tokenizer + random-init Qwen2 into `path` (atomic: a temp folder renamed into place)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Declare the Qwen2 class so AutoTokenizer gives users the same class a real Qwen2 checkpoint has.
    cfg_file = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_file.write_text(json.dumps(tok_cfg, indent=2))
    try:
        os.replace(tmp, path)
    except OSError:  # another process built it first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_model() -> Path:
    """Path of the embedded model, building it on first use."""
    path = cache_dir() / f"tiny-qwen2-{MODEL_VERSION}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_model(path)
    return path


if __name__ == "__main__":
    if "--write-data" in sys.argv:
        write_data()
        print(f"wrote {DATA_DIR}")
    if "--build-model" in sys.argv:
        print(ensure_model())
