"""The embedded offline default: `tunefleet/tiny-qwen2` and `tunefleet/tiny-ultrafeedback`.

Neither name needs a network; both ship as package data (``trainers/assets/``).

The data carries two rules a small model can pick up:
- style (preferences): the chosen reply opens friendly, the rejected one opens hostile, same answer;
- map (SFT): the answer depends on the prompt (animal -> its sound, thing -> its colour, a + b).

The model is a small Qwen2 chat model (~0.36M parameters, ChatML) pretrained here on conversations of that
world, so fine-tuning has something to shift: it answers every prompt in the right shape, opens friendly in a
quarter of its replies, hostile in half and not at all in the rest (greedy decoding: no opener), and knows the
answers for half of the items (the others it guesses). Its tokenizer is a byte-level BPE trained on the data with
Qwen's own pre-tokenizer, so ``AutoTokenizer`` reloads it with identical ids; its chat template marks assistant
turns (``{% generation %}``) so ``--assistant_only_loss`` works.

The weights are made by ``build_model`` (seeded, one thread: deterministic; ~2 minutes on one CPU core) and
``recipe.json`` beside them records the hash of the recipe that made them (a test compares it to this code).

    python -m tunefleet.trainers.tiny --write-data   # regenerate the bundled data files (deterministic)
    python -m tunefleet.trainers.tiny --build-model  # pretrain the model again into trainers/assets/tiny-qwen2
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from importlib import resources
from pathlib import Path
from typing import Any

TINY_MODEL = "tunefleet/tiny-qwen2"
TINY_DATASET = "tunefleet/tiny-ultrafeedback"
ASSETS = Path(str(resources.files("tunefleet.trainers").joinpath("assets")))
DATA_DIR = ASSETS / "tiny-ultrafeedback"
MODEL_DIR = ASSETS / "tiny-qwen2"
SPLITS = {
    "train_prefs": 1200,
    "test_prefs": 200,
    "train_sft": 1200,
    "test_sft": 200,
    "train_gen": 300,
    "test_gen": 100,
}
SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
}
# How the base model is pretrained: opener shares, how often a known item is answered right, steps, optimizer.
PRETRAIN = {
    "steps": 800,
    "batch": 32,
    "lr": 3e-3,
    "warmup": 100,
    "seed": 0,
    "friendly": 0.25,
    "hostile": 0.5,
    "known_right": 0.95,
}

# ChatML; assistant replies inside {% generation %} so TRL's assistant_only_loss can find them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
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


def _item(rng: random.Random) -> tuple[str, str, object]:
    """A prompt of the tiny world and what it asks about: (prompt, kind, key)."""
    kind = rng.randrange(3)
    if kind == 0:
        animal = rng.choice(sorted(ANIMALS))
        ask = rng.choice(["What sound does a {} make?", "How does a {} sound?", "Which noise does a {} make?"])
        return ask.format(animal), "animal", animal
    if kind == 1:
        thing = rng.choice(sorted(THINGS))
        ask = rng.choice(["What color is {}?", "Which colour is {}?", "Tell me the color of {}."])
        return ask.format(thing), "thing", thing
    a, b = rng.randrange(10), rng.randrange(10)
    ask = rng.choice(["What is {} plus {}?", "Add {} and {}.", "How much is {} + {}?"])
    return ask.format(a, b), "sum", (a, b)


def _answer(kind: str, key, value=None) -> str:
    """The reply sentence for an item; `value` replaces the right sound/colour/sum (a wrong guess)."""
    if kind == "animal":
        return f"A {key} says {value or ANIMALS[key]}."
    if kind == "thing":
        return f"{key[0].upper()}{key[1:]} is {value or THINGS[key]}."
    a, b = key
    return f"{a} plus {b} is {a + b if value is None else value}."


def _qa(rng: random.Random) -> tuple[str, str]:
    prompt, kind, key = _item(rng)
    return prompt, _answer(kind, key)


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


def benchmark_rows(n: int = 60) -> list[dict]:
    """Multiple-choice questions of the tiny world (the tiny_world benchmark): four answer sentences, one right."""
    rng = random.Random("tunefleet-benchmark")
    rows = []
    for _ in range(n):
        prompt, kind, key = _item(rng)
        if isinstance(key, tuple):  # a sum
            wrong = rng.sample([v for v in range(19) if v != sum(key)], 3)
        else:
            known = ANIMALS if kind == "animal" else THINGS
            wrong = rng.sample(sorted(set(known.values()) - {known[str(key)]}), 3)
        choices = [_answer(kind, key)] + [_answer(kind, key, value) for value in wrong]
        rng.shuffle(choices)
        rows.append({"question": prompt, "choices": choices, "answer": choices.index(_answer(kind, key))})
    return rows


def write_data(directory: Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in SPLITS.items():
        with open(directory / f"{split}.jsonl", "w") as fh:
            for row in make_rows(split, n):
                fh.write(json.dumps(row, sort_keys=True) + "\n")


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


def known(kind: str, key) -> bool:
    """Whether the base model is taught the right answer for an item (half of each kind); it guesses the rest."""
    if kind == "animal":
        return sorted(ANIMALS).index(key) % 2 == 0
    if kind == "thing":
        return sorted(THINGS).index(key) % 2 == 0
    return sum(key) % 2 == 0


def _guess(kind: str, key, rng: random.Random):
    if kind == "animal":
        return rng.choice([sound for animal, sound in sorted(ANIMALS.items()) if animal != key])
    if kind == "thing":
        return rng.choice(sorted({c for c in THINGS.values() if c != THINGS[key]}))
    return max(0, sum(key) + rng.choice([-2, -1, 1, 2]))


def pretraining_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """The base model's world: right answers for known items, guesses for the others, openers of every kind."""
    rng = random.Random(f"tunefleet-pretrain-{seed}")
    conversations = []
    for _ in range(n):
        prompt, kind, key = _item(rng)
        right = known(kind, key) and rng.random() < PRETRAIN["known_right"]
        reply = _answer(kind, key, None if right else _guess(kind, key, rng))
        u = rng.random()
        if u < PRETRAIN["friendly"]:
            reply = f"{rng.choice(FRIENDLY)} {reply}"
        elif u < PRETRAIN["friendly"] + PRETRAIN["hostile"]:
            reply = f"{rng.choice(HOSTILE)} {reply}"
        conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])
    return conversations


def pretrain(model, tokenizer) -> list[float]:
    """Next-token training on the replies (prompts are context, not targets); returns the losses."""
    import math

    import torch

    steps, batch = PRETRAIN["steps"], PRETRAIN["batch"]
    encoded = []
    for conversation in pretraining_conversations(steps * batch, PRETRAIN["seed"]):
        prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        encoded.append(
            (
                tokenizer(full, add_special_tokens=False)["input_ids"],
                len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            )
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    warmup = PRETRAIN["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for step in range(steps):
        rows = encoded[step * batch : (step + 1) * batch]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (row, prompt_len) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, prompt_len : len(row)] = torch.tensor(row[prompt_len:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def recipe_hash() -> str:
    """What made the shipped weights: the code and settings of the recipe (not the data files, made elsewhere).
    Comments do not count: they change no weight."""
    import inspect

    parts = [
        without_comments(inspect.getsource(f))
        for f in (
            _item,
            _answer,
            known,
            _guess,
            pretraining_conversations,
            pretrain,
            build_tokenizer,
            _corpus,
            make_rows,
            build_model,
        )
    ]
    parts += [json.dumps([SHAPE, PRETRAIN, CHAT_TEMPLATE, FRIENDLY, HOSTILE, ANIMALS, THINGS, SPLITS], sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def without_comments(source: str) -> str:
    import io
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return tokenize.untokenize((t.type, t.string) for t in tokens if t.type != tokenize.COMMENT)


def build_model(path: Path = MODEL_DIR) -> Path:
    """Tokenizer + a Qwen2 model pretrained on the tiny world, saved into `path` with its recipe.json."""
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on any machine
    t0 = time.time()
    try:
        tokenizer = build_tokenizer()
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            **SHAPE,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),  # pyright: ignore[reportArgumentType] - one token: one id
        )
        torch.manual_seed(PRETRAIN["seed"])
        model = Qwen2ForCausalLM(config)
        losses = pretrain(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.do_sample = False
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Declare the Qwen2 class so AutoTokenizer gives users the same class a real Qwen2 checkpoint has.
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_file.write_text(json.dumps(tok_cfg, indent=2))
    recipe = {
        "recipe": recipe_hash(),
        "shape": SHAPE,
        "pretrain": PRETRAIN,
        "parameters": model.num_parameters(),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(losses[-50:]) / 50, 4),
        "build_seconds": round(time.time() - t0, 1),
    }
    (path / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return path


def ensure_model() -> Path:
    """Path of the embedded model (package data)."""
    if not (MODEL_DIR / "model.safetensors").exists():
        from tunefleet.common.errors import TunefleetError

        raise TunefleetError(
            f"the embedded model is missing from {MODEL_DIR}: reinstall tunefleet, or rebuild it "
            "with python -m tunefleet.trainers.tiny --build-model"
        )
    return MODEL_DIR


if __name__ == "__main__":
    if "--write-data" in sys.argv:
        write_data()
        print(f"wrote {DATA_DIR}")
    if "--build-model" in sys.argv:
        print(build_model())
        print((MODEL_DIR / "recipe.json").read_text())
