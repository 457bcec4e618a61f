"""A GRPO reward that imports fine and fails at training time: makes a run fail on purpose."""


def boom(completions, **kwargs):
    raise RuntimeError("reward exploded on purpose")
