"""A stand-in for a newer TRL release: DPOConfig with one field that TRL 1.16 does not have (tests/test_recipes.py)."""

from dataclasses import dataclass, field

from trl import DPOConfig  # pyright: ignore[reportPrivateImportUsage] - trl exports it lazily


@dataclass
class DPOConfigWithNewField(DPOConfig):
    reward_temperature: float = field(default=1.0, metadata={"help": "A knob a later TRL adds."})
