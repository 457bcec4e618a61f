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

Batching: sequences sorted by length, batches of `batch_size`, left padding to the batch's longest with
position ids that count real tokens only; padding never touches a scored position, so batched sums equal the
per-sample ones (tested to 1e-5 relative). The LM head runs on completion positions only, and the two replies of
a preference pair continue from one forward pass over their shared prompt.

Gradients are off with `no_grad`, not `inference_mode`: runs also score with these functions between training
steps (trainers/heldout.py), and tensors made in inference mode cannot take part in the steps after.
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


def chosen_preferred(chosen_sum: float, chosen_count: int, rejected_sum: float, rejected_count: int) -> bool:
    """A preference pair is correct when the chosen reply's mean NLL per token is strictly below the rejected one's."""
    return chosen_sum / chosen_count < rejected_sum / rejected_count


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory peaks fail fast)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(rows: list[list[int]], pad_id: int):
    """(ids, attention mask, position ids) of token rows padded on the left; positions count real tokens only, so
    every row is computed as it would be alone."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
    return ids, attention, (attention.cumsum(1) - 1).clamp(min=0)


def score_batched(model, sequences: list[Sequence], batch_size: int = 16, pad_id: int = 0):
    """Per-sequence (nll_sum, token_count) for completion tokens, in input order.

    Rows are padded on the left, so every completion ends at the batch's last position and the LM head runs on
    the last (longest completion + 1) positions only: prompt positions get no logits (less compute, and no
    tokens x vocabulary float32 block for them)."""

    device = next(model.parameters()).device
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        rows = [list(sequences[i].prompt_ids) + list(sequences[i].completion_ids) for i in batch]
        ids, attention, positions = left_padded(rows, pad_id)
        keep = max(len(sequences[i].completion_ids) for i in batch)
        logits = _logits(model, ids.to(device), attention.to(device), positions.to(device), keep + 1)[:, :-1]
        nll = _nll(logits, ids[:, -keep:].to(device))  # [B, keep]: the last `keep` tokens of every row
        for row, i in enumerate(batch):
            n = len(sequences[i].completion_ids)
            sums[i], counts[i] = float(nll[row, keep - n :].sum()), n
    return sums, counts


def score_pairs(model, pairs: list[tuple[Sequence, Sequence]], batch_size: int = 16, pad_id: int = 0):
    """Per pair [chosen_sum, chosen_count, rejected_sum, rejected_count], in input order.

    Chosen and rejected share their prompt: one forward over the prompt (left-padded, its key/value cache kept),
    then both replies continue from that cache, two rows per prompt. Pairs whose prompts differ are scored as
    two sequences."""
    import torch

    shared = [i for i, (c, r) in enumerate(pairs) if c.prompt_ids == r.prompt_ids]
    out: list[list] = [[] for _ in pairs]
    apart = [i for i in range(len(pairs)) if i not in set(shared)]
    if apart:
        sums, counts = score_batched(model, [s for i in apart for s in pairs[i]], batch_size, pad_id)
        for k, i in enumerate(apart):
            out[i] = [sums[2 * k], counts[2 * k], sums[2 * k + 1], counts[2 * k + 1]]
    device = next(model.parameters()).device
    lengths = [len(pairs[i][0]) + len(pairs[i][1].completion_ids) for i in shared]
    for batch in length_sorted_batches(lengths, batch_size):
        members = [shared[k] for k in batch]
        ids, attention, positions = left_padded([list(pairs[i][0].prompt_ids) for i in members], pad_id)
        replies = [list(pairs[i][side].completion_ids) for i in members for side in (0, 1)]
        width = max(map(len, replies))
        reply_ids = torch.full((len(replies), width), pad_id, dtype=torch.long)
        reply_mask = torch.zeros((len(replies), width), dtype=torch.long)
        for row, reply in enumerate(replies):
            reply_ids[row, : len(reply)] = torch.tensor(reply)
            reply_mask[row, : len(reply)] = 1
        with torch.no_grad():
            prompt_out = model(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
            )
            cache = prompt_out.cache
            cache.batch_repeat_interleave(2)  # each prompt's keys and values, once for each reply
            reply_positions = positions[:, -1:].repeat_interleave(2, 0) + 1 + torch.arange(width)
            logits = model(
                input_ids=reply_ids.to(device),
                attention_mask=torch.cat([attention.repeat_interleave(2, 0), reply_mask], 1).to(device),
                position_ids=reply_positions.to(device),
                cache=cache,
                use_cache=True,
            ).logits
        first = _nll(prompt_out.logits[:, -1:].repeat_interleave(2, 0), reply_ids[:, :1].to(device))[:, 0]
        rest = _nll(logits[:, :-1], reply_ids[:, 1:].to(device)) * reply_mask[:, 1:].to(device)
        totals = (first + rest.sum(1)).tolist()
        for k, i in enumerate(members):
            out[i] = [totals[2 * k], len(replies[2 * k]), totals[2 * k + 1], len(replies[2 * k + 1])]
    return out


def score_one(model, seq: Sequence) -> tuple[float, int]:
    """Reference: one sequence, no padding (what a per-sample loop does)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(seq.prompt_ids) + list(seq.completion_ids)], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    nll = _nll(logits, ids[:, 1:])[0]
    start = len(seq.prompt_ids) - 1
    return float(nll[start:].sum()), len(seq.completion_ids)


def _logits(model, ids, attention, positions, keep: int):
    """Logits of the last `keep` positions (models that cannot skip the others compute all and drop them)."""
    import torch

    with torch.no_grad():
        try:
            out = model(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False, logits_to_keep=keep
            )
        except TypeError:  # a model class without `logits_to_keep` (remote code, older architectures)
            out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
        return out.logits[:, -keep:]


def _nll(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


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
    with torch.no_grad():
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


def reward_model_scores(scorer, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """A reward model's score of each conversation (its last turn is the reply judged), in input order.

    As TRL feeds a reward model: the reward model's own chat template over the whole conversation, tokenized
    without added special tokens, padded on the right; the score is read at each row's last real token."""
    import torch

    if not conversations:
        return []
    if not tokenizer.chat_template:
        raise ValueError("the reward model's tokenizer has no chat template to render the conversations with")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    lengths = [len(t) for t in texts]
    device = next(scorer.parameters()).device
    scores = [0.0] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for batch in length_sorted_batches(lengths, batch_size):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = scorer(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0]
            for row, i in enumerate(batch):
                scores[i] = float(logits[row])
    finally:
        tokenizer.padding_side = side
    return scores
