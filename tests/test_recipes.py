"""The recipes people already have: every TRL option (from TRL's own dataclasses), TRL's form of a config file, the
alignment-handbook's mixtures, older libraries' keys, and full fine-tuning."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from pathlib import Path

import pytest
import yaml
from testkit import FAST, TINY, read_json, run_cli, tunefleet

from tunefleet.common.errors import TunefleetError
from tunefleet.trainers import config, recipe_file, trainer_args, trl_fields

TINY_SPEC = {"model_name": "tunefleet/tiny-qwen2", "dataset": "tunefleet/tiny-ultrafeedback", "use_qlora": False}
REQUIRED = {"model_name": "tunefleet/tiny-qwen2", "dataset": "tunefleet/tiny-ultrafeedback", "output_dir": "o"}
# Read under another name (TRL's names, renamed keys, the adapter choice, the test split): tested by name below.
TRANSLATED = {
    *recipe_file.TRL_NAMES,
    *recipe_file.RENAMED,
    *recipe_file.ADAPTER_KEYS,
    *recipe_file.REFUSED,
    "dataset_test_split",
}


def sample(f: trl_fields.TrlField, method: str):
    """A value of the field's own type (its first form), other than its default."""
    default = f.default_for(method)
    form = f.forms[0]
    if form == "bool":
        return not bool(default)
    if form == "choice":
        return next(c for c in f.choices if c != default)
    if form == "list":
        return {"int": [1, 2], "float": [0.5, 1.5], "bool": [True, False]}.get(f.element, ["alpha", "beta"])
    return {"int": 3, "float": 0.25, "false": False, "dict": {"key": 1}, "str": "text"}[form]


def settable(method: str) -> dict[str, trl_fields.TrlField]:
    """The TRL options a run of `method` takes with no tunefleet setting of the same name: from TRL's classes."""
    return {
        name: f
        for name, f in sorted(trl_fields.fields_of(method).items())
        if name not in config.FIELDS and name not in TRANSLATED and "object" not in f.forms
    }


def as_flags(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        if isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{name}", json.dumps(value)]
        else:
            argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


@pytest.mark.parametrize("method", config.METHODS)
def test_every_trl_field_is_accepted_from_yaml_and_as_a_flag(method, tmp_path):
    fields = settable(method)
    assert len(fields) > 80  # TRL 1.16: 94 (ORPO) to 162 (GRPO)
    values = {name: sample(f, method) for name, f in fields.items()}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": method, **REQUIRED, **values}))
    from_yaml = config.parse_args(["--config", str(path)])
    from_flags = config.parse_args(["--method", method, *as_flags(REQUIRED), *as_flags(values)])
    assert from_yaml.trl_args == values
    assert from_flags.trl_args == values
    # A field that holds a Python object (accelerate's ParallelismConfig) is refused in one line.
    for name, f in trl_fields.fields_of(method).items():
        if "object" in f.forms:
            with pytest.raises(TunefleetError, match=f"{name} holds a Python object"):
                config.parse_args(["--method", method, *as_flags(REQUIRED), f"--{name}", "x"])


@pytest.mark.slow
@pytest.mark.parametrize("method", config.METHODS)
def test_every_trl_field_reaches_the_trainers_arguments(method, tmp_path):
    """Each field alone, with a value of its type, lands on the config object the trainer is given (trainer.args);
    where TRL's own checks refuse the value (they need other settings with it), the refusal is one line quoting TRL."""
    config_class = trl_fields.load_class(*trl_fields.METHOD_CLASSES[method])
    own = {f.name for f in dataclasses.fields(config_class)}
    cfg = config.from_dict({"method": method, **REQUIRED})
    reached, refused = [], {}
    for name, f in settable(method).items():
        if name not in own:
            continue  # ModelConfig / ScriptArguments: the model and data loading read those
        value = sample(f, method)
        cfg.trl_args = {name: value}
        try:
            args = trainer_args.trl_config(config_class, cfg, output_dir=str(tmp_path), use_cpu=True, report_to=[])
        except TunefleetError as exc:
            assert str(exc).startswith(f"TRL's {config_class.__name__} refused the settings: ") and "\n" not in str(
                exc
            )
            refused[name] = str(exc)
            continue
        got = getattr(args, name)
        got = got.value if isinstance(got, enum.Enum) else got
        if name == "include_num_input_tokens_seen":
            got = {"no": False, "all": True}.get(got, got)  # transformers spells the booleans as names
        assert got == value, name
        reached.append(name)
    assert len(refused) <= 0.1 * (len(reached) + len(refused)), refused


def test_translated_names_mean_what_they_mean_in_trl(tmp_path):
    cfg = config.parse_args(
        [
            "--method", "dpo", "--model_name_or_path", "tunefleet/tiny-qwen2", "--dataset_name", "tunefleet/tiny-ultrafeedback",
            "--dataset_train_split", "train_prefs", "--dataset_test_split", "test_prefs", "--eval_strategy", "steps",
            "--output_dir", "o", "--use_peft", "--load_in_4bit", "--torch_dtype", "float32", "--report_to", "none",
        ]
    )  # fmt: skip
    assert (cfg.model_name, cfg.dataset, cfg.split, cfg.eval_split) == (
        "tunefleet/tiny-qwen2",
        "tunefleet/tiny-ultrafeedback",
        "train_prefs",
        "test_prefs",
    )
    assert (cfg.finetune, cfg.dtype, cfg.config_form) == ("qlora", "float32", "trl")
    # TRL's form takes TRL's defaults for what it leaves out: DPOConfig's learning rate and batch, not tunefleet's.
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1e-6, 8, 1)
    assert "'torch_dtype' read as 'dtype'" in " ".join(cfg.config_notes)
    # Without use_peft, TRL trains the whole model; tunefleet's own form keeps QLoRA.
    trl_form = config.parse_args(
        ["--method", "sft", "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    )
    own_form = config.parse_args(["--method", "sft", "--model_name", "m", "--dataset", "d", "--output_dir", "o"])
    assert (trl_form.finetune, own_form.finetune) == ("full", "qlora")
    # The old flag still works; a TRL test split without evaluation is said, not dropped silently.
    old = config.parse_args(
        ["--method", "sft", *as_flags(REQUIRED), "--use_qlora", "false", "--dataset_test_split", "t"]
    )
    assert old.finetune == "lora" and old.eval_split is None
    assert any("dataset_test_split: t' is evaluated only with eval_strategy" in n for n in old.config_notes)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr_sheduler_type", "cosine"], "unknown key 'lr_sheduler_type' (did you mean 'lr_scheduler_type'?)"),
        (["--packing", "true"], "'packing' is an option of SFTConfig (sft), not of dpo's DPOConfig"),
        (["--num_generations", "8"], "--num_generations: GRPO only, not dpo"),
        (
            ["--max_prompt_length", "512"],
            "'max_prompt_length': TRL 1.16's DPOConfig no longer cuts prompts on their own",
        ),
        (["--warmup_steps", "some"], "bad value for 'warmup_steps': expected float, got 'some'"),
        (["--optim", "adamw_tourch"], "bad value for 'optim': expected one of"),
        (["--model_name_or_path", "x"], "'model_name' and 'model_name_or_path' are one setting (model_name)"),
        (["--dataset_streaming"], "'dataset_streaming': tunefleet samples, counts and mixes whole datasets"),
        (
            ["--tokenizer_name_or_path", "x"],
            "'tokenizer_name_or_path': the tokenizer is loaded from the model's folder",
        ),
        (
            ["--load_in_4bit", "--use_peft", "false"],
            "'load_in_4bit' quantizes the base, whose weights then cannot train",
        ),
        (["--use_qlora", "--use_peft"], "'use_qlora' and 'use_peft' both choose the adapters"),
    ],
)
def test_bad_trl_input_is_one_line(argv, message, capsys):
    code, out, err = run_cli(capsys, "train", "--method", "dpo", *as_flags(REQUIRED), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_value_trl_refuses_is_one_line_with_trls_message(tmp_path, capsys, tiny_model):
    code, out, err = run_cli(
        capsys, "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", tmp_path / "r",
        "--max_steps", 1, "--use_qlora", "false", "--load_best_model_at_end", "--save_strategy", "steps",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "error: TRL's SFTConfig refused the settings: --load_best_model_at_end requires the save and eval" in err


def test_help_all_lists_every_trl_field_of_the_method(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help-all", "--method", "grpo"])
    out = capsys.readouterr().out
    listed = set(re.findall(r"^[* ] --(\w+)  \(", out, re.MULTILINE))
    assert listed == set(trl_fields.fields_of("grpo"))
    assert "* --num_generations  (int; default 8)" in out and "* --learning_rate" in out
    assert "--lr_scheduler_type  (one of linear, cosine," in out
    assert "Number of generations to sample." in out  # TRL's own help text
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--help-all" in out and "\n  --finetune" in out and "\n  --lr_scheduler_type" not in out


HANDBOOK_DPO = """\
# A recipe in TRL's form, as the alignment-handbook writes them (the embedded model and data).
model_name_or_path: tunefleet/tiny-qwen2
model_revision: main
torch_dtype: float32
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
chat_template: "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
dataset_mixture:
  datasets:
    - id: tunefleet/tiny-ultrafeedback
      split: train_prefs
      columns: [prompt, chosen, rejected]
      weight: 0.5
    - id: tunefleet/tiny-ultrafeedback
      split: test_prefs
      columns: [prompt, chosen, rejected]
      weight: 1.0
  test_split_size: 0.1
  seed: 0
preprocessing_num_workers: 1
beta: 0.05
eval_strategy: steps
eval_steps: 2
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
learning_rate: 5.0e-6
logging_steps: 1
lr_scheduler_type: cosine
max_length: 256
max_steps: 2
optim: paged_adamw_32bit
per_device_train_batch_size: 4
per_device_eval_batch_size: 4
report_to: [none]
save_strategy: "steps"
save_steps: 100
seed: 42
warmup_ratio: 0.1
"""


def test_a_handbook_recipe_in_trls_form_trains_as_written(tmp_path, tiny_model, capsys):
    import hashlib

    import torch

    recipe, out = tmp_path / "dpo.yaml", tmp_path / "runs" / "dpo_handbook"
    recipe.write_text(HANDBOOK_DPO + f"output_dir: {out}\n")
    log = tunefleet("train", "--method", "dpo", "--config", recipe).stdout
    assert log.index("config: read in TRL's form") < log.index("step 1 ")
    assert "config: trl's form; dpo trains LoRA adapters of tunefleet/tiny-qwen2" in log
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.optim.value) == ("cosine", 0.1, "paged_adamw_32bit")
    assert (args.learning_rate, args.beta, args.eval_strategy.value, args.dataset_num_proc) == (5e-6, 0.05, "steps", 1)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    adapter = read_json(out / "adapter_config.json")
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert (out / "chat_template.jinja").read_text() == yaml.safe_load(HANDBOOK_DPO)["chat_template"]
    record = read_json(out / "run.json")
    train, held_out = record["data"]["train"], record["data"]["eval"]
    assert [p["rows"] for p in train["parts"]] == [600, 200]  # weight 0.5 of 1200 rows, all 200
    assert (train["rows"], held_out["rows"]) == (720, 80)  # test_split_size 0.1 of the 800
    history = read_json(out / "trainer_state.json")["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [2]  # evaluated on the held-out rows
    # The evaluation renders conversations with the run's template: its group (and base row) is scored under it.
    code, stdout, stderr = run_cli(
        capsys, "eval", "--runs_dir", tmp_path / "runs", "--dataset", "tunefleet/tiny-ultrafeedback",
        "--max_samples", 8, "--max_generation_samples", 1,
    )  # fmt: skip
    assert code == 0, stderr
    template = yaml.safe_load(HANDBOOK_DPO)["chat_template"]
    base_row = f"base:tunefleet/tiny-qwen2 @template-{hashlib.sha256(template.encode()).hexdigest()[:8]}"
    assert set(read_json(tmp_path / "runs" / "evaluation_results.json")) == {"dpo_handbook", base_row}


def test_older_keys_are_honoured_with_a_note(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "dpo",
                "model_name_or_path": "tunefleet/tiny-qwen2",
                "dataset_mixer": {"tunefleet/tiny-ultrafeedback": 0.5},
                "dataset_splits": ["train_prefs", "test_prefs"],
                "evaluation_strategy": "steps",
                "max_seq_length": 128,
                "preprocessing_num_workers": 2,
                "output_dir": "o",
            }
        )
    )
    cfg = config.parse_args(["--config", str(path)])
    assert cfg.mixture and (cfg.mixture[0].portion, cfg.mixture[0].split) == (0.5, "train_prefs")
    assert (cfg.eval_split, cfg.max_length, cfg.trl_args["eval_strategy"]) == ("test_prefs", 128, "steps")
    assert cfg.trl_args["dataset_num_proc"] == 2
    notes = " ".join(cfg.config_notes)
    assert "'dataset_mixer' read as a mixture (today's key: dataset_mixture)" in notes
    assert (
        "'evaluation_strategy' read as 'eval_strategy'" in notes and "'max_seq_length' read as 'max_length'" in notes
    )


def test_trls_dataset_mixture_form(tmp_path):
    cfg = config.from_dict(
        {
            "method": "sft",
            "model_name": "m",
            "output_dir": "o",
            "datasets": [
                {"path": "tunefleet/tiny-ultrafeedback", "split": "train_sft", "columns": ["messages"], "fraction": 2},
                {"path": "tunefleet/tiny-ultrafeedback", "split": "test_sft", "columns": ["messages"], "fraction": 1},
            ],
        }
    )
    assert [(p.split, p.select_columns, p.weight) for p in cfg.mixture or []] == [
        ("train_sft", ["messages"], 2.0),
        ("test_sft", ["messages"], 1.0),
    ]
    with pytest.raises(TunefleetError, match="'datasets' entry key 'data_dir' is not read"):
        config.from_dict({"method": "sft", **REQUIRED, "datasets": [{"path": "x", "data_dir": "d"}]})


def test_full_fine_tuning_trains_every_weight_is_evaluated_beside_adapters_and_exports(tmp_path, capsys, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    for name, finetune, steps in (("sft_full", "full", 30), ("sft_lora", "lora", 4)):
        code, stdout, stderr = run_cli(
            capsys, "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", runs / name,
            "--finetune", finetune, "--max_steps", steps, "--learning_rate", "1e-3", *FAST,
            "--per_device_train_batch_size", 8,
        )  # fmt: skip
        assert code == 0, stderr
    out = runs / "sft_full"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    losses = [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in trained.named_parameters() if not p.equal(base.get_parameter(n))]
    assert len(changed) == len(list(base.named_parameters()))  # every weight
    assert read_json(out / "run.json")["config"]["finetune"] == "full"

    # The evaluator scores the full run as a model of its own, in the same plan as the adapter runs and the base.
    code, stdout, stderr = run_cli(
        capsys, "eval", "--runs_dir", runs, "--max_samples", 12, "--max_generation_samples", 1
    )  # fmt: skip
    assert code == 0, stderr
    results = read_json(runs / "evaluation_results.json")
    assert set(results) == {"base:tunefleet/tiny-qwen2", "sft_full", "sft_lora"}
    full = results["sft_full"]
    assert full["error"] is None and full["method"] == "sft" and full["base_model"] == "tunefleet/tiny-qwen2"
    assert full["test_loss"] != results["base:tunefleet/tiny-qwen2"]["test_loss"]
    assert full["win_rate_vs_base"] is not None and full["reward_accuracy"] is not None

    # Export copies the model, or converts it to the dtype asked for; --adapter_only has no adapter to copy.
    code, stdout, stderr = run_cli(
        capsys, "export", out, "--output_dir", tmp_path / "exported", "--dtype", "bfloat16"
    )  # fmt: skip
    assert code == 0 and "wrote model of sft_full" in stdout, stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert exported.dtype == torch.bfloat16
    assert exported.get_parameter("model.norm.weight").equal(trained.get_parameter("model.norm.weight").bfloat16())
    assert "- full" in (tmp_path / "exported" / "README.md").read_text()
    code, stdout, stderr = run_cli(capsys, "export", out, "--output_dir", tmp_path / "x", "--adapter_only")
    assert code == 2 and "is a full fine-tuning run (no adapter)" in stderr


# ------------------------------------------------------------------ TRL's options in sweeps and searches
def test_a_grid_over_a_trl_option_trains_each_value(tmp_path, tiny_model):
    from tunefleet.launcher import sweep as sweeps

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "schedules",
                "runs_dir": str(tmp_path / "runs"),
                "naming": "{method}_{lr_scheduler_type}",
                "base": {**TINY_SPEC, "split": "train_prefs", "max_steps": 2, "warmup_ratio": 0.1},
                "grid": {"method": ["dpo"], "lr_scheduler_type": ["cosine", "constant_with_warmup"]},
            }
        )
    )
    runs = sweeps.expand(sweeps.load_spec(str(spec)))
    assert {r.name: r.config.trl_args["lr_scheduler_type"] for r in runs} == {
        "dpo_cosine": "cosine",
        "dpo_constant_with_warmup": "constant_with_warmup",
    }
    tunefleet("sweep", spec)
    import torch

    for name, schedule in (("dpo_cosine", "cosine"), ("dpo_constant_with_warmup", "constant_with_warmup")):
        args = torch.load(tmp_path / "runs" / name / "training_args.bin", weights_only=False)
        assert (args.lr_scheduler_type.value, args.warmup_steps) == (schedule, 0.1)


def test_a_search_over_trl_options_plans_trials_with_them(tmp_path, capsys):
    from tunefleet.launcher import sweep as sweeps
    from tunefleet.launcher import tune_search

    def write(space: dict):
        spec = {
            "name": "warmups",
            "runs_dir": str(tmp_path / "runs"),
            "base": {**TINY_SPEC, "split": "train_prefs", "eval_split": "test_prefs", "max_steps": 12},
            "search": {"metric": "eval_loss", "num_samples": 2, "space": {"dpo": space}},
        }
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return str(tmp_path / "spec.yaml")

    path = write({"warmup_ratio": {"uniform": [0.0, 0.3]}, "lr_scheduler_type": {"choice": ["cosine", "linear"]}})
    loaded = sweeps.load_spec(path)
    assert loaded.search is not None
    plan = tune_search.trial_setups(loaded, loaded.search)["dpo"].plan(
        "t_00001", {"warmup_ratio": 0.2, "lr_scheduler_type": "linear"}
    )
    assert plan.config.trl_args == {"warmup_steps": 0.2, "lr_scheduler_type": "linear"}
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
    assert code == 0 and "warmup_ratio uniform" in out
    with pytest.raises(TunefleetError, match="uniform needs a float flag, but 'lr_scheduler_type' is a string"):
        sweeps.load_spec(write({"lr_scheduler_type": {"uniform": [0, 1]}}))


SFT_RECIPE = """\
model_name_or_path: tunefleet/tiny-qwen2
dataset_name: tunefleet/tiny-ultrafeedback
dataset_train_split: train_sft
use_peft: true
lora_target_modules: all-linear
learning_rate: 5.0e-3
lr_scheduler_type: cosine
warmup_ratio: 0.1
max_steps: 4
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
output_dir: data/where-the-recipe-wrote   # the sweep names each run's folder
"""
DPO_RECIPE = """\
model_name_or_path: my-org/tiny-sft   # the pipeline gives each DPO run its SFT parent instead
dataset_name: tunefleet/tiny-ultrafeedback
dataset_train_split: train_prefs
use_peft: true
lora_target_modules: [q_proj, v_proj]
learning_rate: 3.0e-3
beta: 0.05
lr_scheduler_type: constant
max_steps: 4
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
"""


def test_a_two_stage_study_from_an_sft_recipe_and_a_dpo_recipe(tmp_path, tiny_model):
    import hashlib

    from tunefleet.launcher import sweep as sweeps

    (tmp_path / "sft.yaml").write_text(SFT_RECIPE)
    (tmp_path / "dpo.yaml").write_text(DPO_RECIPE)
    spec = {
        "name": "recipes",
        "runs_dir": str(tmp_path / "runs"),
        "base": {"logging_steps": 2},  # the spec's keys override the recipes'
        "stages": {
            "sft": {"grid": {"method": ["sft"], "seed": [1, 2]}, "methods": {"sft": {"recipe": "sft.yaml"}}},
            "aligned": {"from": "sft", "grid": {"method": ["dpo"]}, "methods": {"dpo": {"recipe": "dpo.yaml"}}},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = sweeps.expand(sweeps.load_spec(str(tmp_path / "spec.yaml")))
    assert [r.name for r in runs] == [
        "sft_tiny-qwen2_s1",
        "sft_tiny-qwen2_s2",
        "sft_tiny-qwen2_s1-dpo",
        "sft_tiny-qwen2_s2-dpo",
    ]
    tunefleet("sweep", tmp_path / "spec.yaml")
    for name, recipe, targets in (
        ("sft_tiny-qwen2_s2", "sft.yaml", None),
        ("sft_tiny-qwen2_s2-dpo", "dpo.yaml", ["q_proj", "v_proj"]),
    ):
        record = read_json(tmp_path / "runs" / name / "run.json")
        cfg = record["config"]
        assert record["status"] == "finished" and cfg["config_form"] == "trl" and cfg["finetune"] == "lora"
        assert cfg["recipe"] == str(tmp_path / recipe)
        assert cfg["recipe_sha256"] == hashlib.sha256((tmp_path / recipe).read_bytes()).hexdigest()
        assert cfg["logging_steps"] == 2 and cfg["output_dir"] == str(tmp_path / "runs" / name)
        if targets:
            assert sorted(read_json(tmp_path / "runs" / name / "adapter_config.json")["target_modules"]) == targets
            assert cfg["model_name"] == str(tmp_path / "runs" / "sft_tiny-qwen2_s2")  # its parent, not the recipe's
            assert (cfg["beta"], cfg["trl_args"]["lr_scheduler_type"]) == (0.05, "constant")


@pytest.mark.slow
@pytest.mark.parametrize(
    "env,message",
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_token"}, "push_to_hub: the hub is off here (HF_HUB_OFFLINE"),
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}, "push_to_hub needs a Hugging Face token"),
        (
            {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_token", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "push_to_hub: the hub at http://127.0.0.1:9 did not accept this token or did not answer",
        ),
    ],
)
def test_push_to_hub_without_a_reachable_hub_is_one_line_before_training(env, message, tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = tunefleet(
        "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", out, "--max_steps", 1,
        "--push_to_hub", "--hub_model_id", "me/tiny-sft", "--hub_strategy", "end", check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (out / "trainer_state.json").exists() and "step 1 " not in proc.stdout


def test_auto_launch_counts_a_full_runs_gradients_and_optimizer_states():
    from tunefleet.launcher.launch import choose_config
    from tunefleet.trainers import memory

    gib = 2**30
    # 7B in bf16: 13 GiB of weights fit one 80 GiB GPU for LoRA; 52 GiB of weights + gradients + Adam do not.
    assert choose_config("auto", 8, 7 * 10**9, 2, 80 * gib).config == "ddp"
    sharded = choose_config("auto", 8, 7 * 10**9, 2, 80 * gib, full=True)
    assert sharded.config == "zero3" and "weights, gradients and Adam states 52.2 GiB > 50%" in sharded.reason
    # 70B: 522 GiB, 65 GiB a process over 8 GPUs: still more than half of one, so offload as well.
    offload = choose_config("auto", 8, 70 * 10**9, 2, 80 * gib, full=True)
    assert offload.config == "zero3_offload" and "65.2 GiB a process even sharded over 8" in offload.reason
    assert choose_config("auto", 2, 10**8, 2, 80 * gib, full=True).config == "ddp"
    # The memory estimate (GPU packing) counts the same states, and DPO's reference copy.
    shape = memory.ModelShape(10**9, 8 * 10**8, 2048, 24, 16, 512, 5504, 32000)
    lora = memory.estimate(shape, "sft", 1, 512, qlora=False)
    full = memory.estimate(shape, "sft", 1, 512, full=True)
    assert full.adapter == 3 * 2 * 10**9 and full.weights == lora.weights
    assert memory.estimate(shape, "dpo", 1, 512, full=True).weights == 2 * full.weights


@pytest.mark.slow
def test_a_two_process_zero3_full_fine_tuning_run_on_cpu(tmp_path, capsys, tiny_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    code, stdout, stderr = run_cli(
        capsys, "train", "--method", "sft", *TINY, "--split", "train_sft", "--output_dir", out, "--finetune", "full",
        "--max_steps", 4, "--save_steps", 2, "--learning_rate", "1e-3", *FAST,
        "--num_processes", 2, "--accelerate_config", "zero3",
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    record = read_json(out / "run.json")
    assert (record["status"], record["world_size"], record["launch"]["accelerate_config"]) == ("finished", 2, "zero3")
    trained = AutoModelForCausalLM.from_pretrained(out)  # gathered whole from the shards at the save
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not any(p.equal(base.get_parameter(n)) for n, p in trained.named_parameters())


@pytest.mark.slow
def test_a_full_fine_tuning_run_is_a_later_stages_base_without_a_merge(tmp_path, tiny_model):
    (tmp_path / "sft.yaml").write_text(
        SFT_RECIPE.replace("use_peft: true\n", "").replace("lora_target_modules: all-linear\n", "")
    )
    (tmp_path / "dpo.yaml").write_text(DPO_RECIPE)
    spec = {
        "name": "full_then_lora",
        "runs_dir": str(tmp_path / "runs"),
        "eval": {"max_samples": 12, "max_generation_samples": 1},
        "stages": {
            "sft": {"grid": {"method": ["sft"], "seed": [1]}, "methods": {"sft": {"recipe": "sft.yaml"}}},
            "aligned": {"from": "sft", "grid": {"method": ["dpo"]}, "methods": {"dpo": {"recipe": "dpo.yaml"}}},
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    tunefleet("sweep", tmp_path / "spec.yaml", "--eval")
    parent, child = tmp_path / "runs" / "sft_tiny-qwen2_s1", tmp_path / "runs" / "sft_tiny-qwen2_s1-dpo"
    assert read_json(parent / "run.json")["config"]["finetune"] == "full" and not (parent / "merged").exists()
    lineage = read_json(child / "run.json")["lineage"]
    assert lineage["parent_name"] == parent.name and lineage["root_model"] == "tunefleet/tiny-qwen2"
    assert set(lineage["weights_sha256"]) == {"model.safetensors"}
    results = read_json(tmp_path / "runs" / "evaluation_results.json")
    assert results[parent.name]["win_rate_vs_base"] is not None and results[parent.name]["error"] is None
    assert (
        results[child.name]["win_rate_vs_parent"] is not None and results[child.name]["win_rate_vs_base"] is not None
    )


def test_a_field_a_newer_trl_adds_is_taken_without_a_tunefleet_change(tmp_path, monkeypatch):
    """The field list is read from TRL's classes: a config class with one more field (as a TRL upgrade brings) is
    accepted, typed and passed on with no change to tunefleet."""
    import sys

    import trl  # noqa: F401 - loaded here, the table is built in this process (where the stand-in class is found)

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    monkeypatch.setitem(trl_fields.METHOD_CLASSES, "dpo", ("newer_trl", "DPOConfigWithNewField"))
    monkeypatch.setenv("TUNEFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trl_fields, "versions", lambda: "newer")  # the cache is kept per TRL version
    trl_fields.table.cache_clear()
    try:
        cfg = config.parse_args(["--method", "dpo", *as_flags(REQUIRED), "--reward_temperature", "0.7"])
        assert cfg.trl_args == {"reward_temperature": 0.7}
        with pytest.raises(TunefleetError, match="bad value for 'reward_temperature': expected float"):
            config.parse_args(["--method", "dpo", *as_flags(REQUIRED), "--reward_temperature", "warm"])
        config_class = trl_fields.load_class("newer_trl", "DPOConfigWithNewField")
        args = trainer_args.trl_config(config_class, cfg, output_dir=str(tmp_path), use_cpu=True, report_to=[])
        assert args.reward_temperature == 0.7
        assert (tmp_path / "cache" / "trl_fields-v2-newer.json").is_file()
    finally:
        sys.path.remove(str(Path(__file__).parent / "helpers"))
        trl_fields.table.cache_clear()
