"""Exact batched scoring: per-sample NLL sums and token counts of completions given prompts.

Definitions (README "Evaluation"):
- A scored sequence is (prompt, completion). The prompt is the chat template of every message before the
  last, with the assistant generation prompt; the completion is the rest of the templated conversation
  (the last assistant reply and its end-of-turn tokens). Prompt and completion are tokenized separately
  and concatenated, so batching can never move the boundary. Only completion tokens are scored.
- `test_loss` = token-weighted mean NLL over the completion tokens of the SFT test conversations;
  `perplexity` = exp(test_loss).
- A preference pair is correct when the mean NLL per token of the chosen completion is strictly lower than
  that of the rejected one, given the same prompt.
- `reward_accuracy`: the DPO implicit reward log p_policy(y|x) - log p_base(y|x) (summed over completion
  tokens) ranks chosen above rejected.

Batching: sequences sorted by length, batches of `batch_size`, right padding to the batch's longest,
causal attention mask; padding never touches a scored position, so batched sums equal the per-sample
ones (tested to 1e-5 relative).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sequence:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    def __len__(self):
        return len(self.prompt_ids) + len(self.completion_ids)


def encode_conversation(tokenizer, messages: list[dict], max_length: int = 2048) -> Sequence:
    """Split a conversation into (prompt, last reply) token ids with the model's chat template."""
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently inside the full conversation")
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    keep = max(1, max_length - len(completion))
    return Sequence(tuple(prompt[-keep:]), tuple(completion[: max_length - 1]))


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory peaks fail fast)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_batched(model, sequences: list[Sequence], batch_size: int = 16, pad_id: int = 0):
    """Per-sequence (nll_sum, token_count) for completion tokens, in input order."""
    import torch

    device = next(model.parameters()).device
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            seq = sequences[i]
            tokens = list(seq.prompt_ids) + list(seq.completion_ids)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            scored[row, len(seq.prompt_ids) : len(tokens)] = True
        nll = _token_nll(model, ids.to(device), attention.to(device))  # [B, width-1], predicts tokens 1..
        mask = scored[:, 1:].to(device)
        batch_sums = (nll * mask).sum(dim=1).tolist()
        batch_counts = mask.sum(dim=1).tolist()
        for row, i in enumerate(batch):
            sums[i], counts[i] = batch_sums[row], int(batch_counts[row])
    return sums, counts


def score_one(model, seq: Sequence) -> tuple[float, int]:
    """Reference: one sequence, no padding (what a per-sample loop does)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(seq.prompt_ids) + list(seq.completion_ids)], device=device)
    nll = _token_nll(model, ids, torch.ones_like(ids))[0]
    start = len(seq.prompt_ids) - 1
    return float(nll[start:].sum()), len(seq.completion_ids)


def _token_nll(model, ids, attention):
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def generate(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, adapter_names: list[str] | None = None
) -> list[str]:
    """Greedy replies to several conversations in one left-padded batch (the report's generation samples).

    `adapter_names` (PEFT mixed-adapter batch): row i uses adapter adapter_names[i] ("__base__": none), so
    the samples of many runs come from one generate call.
    """
    import torch

    if not conversations:
        return []
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        extra = {"adapter_names": adapter_names} if adapter_names else {}
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
    width = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
