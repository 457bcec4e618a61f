"""Peak memory of a training run, estimated from the model's config before anything loads.

What a QLoRA/LoRA run holds at its peak, per device (a full fine-tuning run: the weights in the compute dtype, and a
gradient and two Adam moments for each, instead of the adapter):
- weights: linear layers in 4 bits (NF4 + double-quantized absmax, ~0.52 byte/param) with QLoRA, else in the
  compute dtype; embeddings and norms in the compute dtype;
- the adapter: LoRA A and B on every linear layer (rank r), fp32, with gradients and two Adam moments (16
  bytes/param);
- activations kept for the backward pass: per token and layer ~14 hidden + 3 kv + 5 intermediate values in the
  compute dtype (inputs of every adapted linear and their dropout copies, attention and MLP intermediates), plus
  the attention scores where the kernel materialises them (eager, or SDPA's math path on CPU); with gradient
  checkpointing, one hidden vector per token and layer plus one layer's worth;
- the LM head: TRL (1.16) never builds the full logits for SFT, DPO, KTO and GRPO: it scores tiles of at most
  4096 tokens x 32768 vocabulary entries in fp32, about 2 alive at once with its Triton kernel on a GPU, 7 with
  the torch fallback on CPU (measured); ORPO builds tokens x vocabulary logits plus three fp32 copies;
- method: DPO and ORPO score chosen and rejected together (twice the tokens), KTO adds its KL batch; their
  reference pass (adapter off, no gradient) is freed before the policy pass, so it does not add to the peak;
  GRPO adds the KV cache and sampling logits of its generations.

`tunefleet sweep` uses it to pack runs onto GPUs (`resources.gpus_per_run: auto`); `bench/memory_estimate.py`
compares it with measured peaks (bench/README.md gives the error).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tunefleet.common.contract import PLACEMENT_ENV, json_from_env

if TYPE_CHECKING:
    from tunefleet.trainers.config import TrainConfig


GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 1 / 256  # 4-bit weights + absmax per 64 (8-bit, double-quantized) + second level
# Activations kept per method, relative to the per-token formula: fitted to peaks measured with
# bench/memory_estimate.py on two model sizes (bench/README.md states the fit and its error on a third).
ACTIVATION_SCALE = {"sft": 1.55, "dpo": 1.15, "orpo": 1.15, "kto": 1.35, "grpo": 1.6, "rm": 1.15}
HEAD_TILE = (4096, 32768)  # TRL's chunked log-prob tile: tokens x vocabulary entries
HEAD_TILES_ALIVE = {"gpu": 2, "cpu": 7}


@dataclass(frozen=True)
class ModelShape:
    params: int
    linear_params: int  # the decoder's Linear layers: what QLoRA stores in 4 bits and LoRA adapts
    hidden: int
    layers: int
    heads: int
    kv_dim: int  # key/value heads x head dim
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Decoder-only transformer with gated MLP (Llama, Qwen2, Mistral, ...), from its HF config."""
        text = getattr(config, "text_config", None) or config
        h, layers = text.hidden_size, text.num_hidden_layers
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or h // heads
        kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
        inter = getattr(text, "intermediate_size", None) or 4 * h
        vocab = text.vocab_size
        per_layer = h * heads * head_dim * 2 + h * kv_dim * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
        linear = layers * per_layer
        embeddings = vocab * h * (1 if getattr(text, "tie_word_embeddings", True) else 2)
        return cls(linear + embeddings + layers * 2 * h, linear, h, layers, heads, kv_dim, inter, vocab)

    @property
    def lora_in_out(self) -> int:
        """Sum of (in + out) over one layer's adapted linears: LoRA parameters per layer = r x this."""
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
        return (h + h) * 2 + (h + kv) * 2 + (h + inter) * 2 + (inter + h)


def shape_of(model_name: str, trust_remote_code: bool = False) -> ModelShape | None:
    """The shape from the model's config.json (no weights loaded); None where it cannot be read."""
    try:
        from transformers import AutoConfig

        from tunefleet.trainers.model import resolve

        return ModelShape.from_config(
            AutoConfig.from_pretrained(resolve(model_name), trust_remote_code=trust_remote_code)
        )
    except Exception:
        return None


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter: int
    activations: int
    logits: int
    generation: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits + self.generation

    def record(self) -> dict:
        return {k: round(v / GIB, 3) for k, v in asdict(self).items()} | {"total_gb": round(self.total / GIB, 3)}


def estimate(
    shape: ModelShape,
    method: str,
    batch: int,
    seq_len: int,
    lora_r: int = 16,
    qlora: bool = True,
    dtype_bytes: int = 2,
    gradient_checkpointing: bool = False,
    quadratic_attention: bool = False,
    completion_len: int = 64,
    device: str = "gpu",
    full: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one training process (pure). `device`: "gpu" (what `max_memory_allocated` counts) or "cpu"
    (resident memory: the safetensors pages of the weights stay mapped beside the tensors, and TRL's LM head runs
    its torch fallback). `full`: full fine-tuning: no adapter, but every weight has a gradient and two Adam
    moments in its own dtype (counted under `adapter`, the trained state)."""
    dense = shape.params - shape.linear_params
    weights = shape.linear_params * (NF4_BYTES if qlora and not full else dtype_bytes) + dense * dtype_bytes
    if device == "cpu":
        weights += shape.params * dtype_bytes
    if full and method in ("dpo", "kto"):
        weights += shape.params * dtype_bytes  # without adapters to turn off, TRL keeps a reference copy
    adapter = shape.params * dtype_bytes * 3 if full else lora_r * shape.lora_in_out * shape.layers * 16
    sequences = batch * {"dpo": 2, "orpo": 2, "kto": 2, "rm": 2}.get(method, 1)
    length = seq_len + (completion_len if method == "grpo" else 0)
    tokens = sequences * length
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    per_token_layer = (14 * h + 3 * kv + 5 * inter) * dtype_bytes
    scores = sequences * shape.heads * length * length * dtype_bytes * 2 if quadratic_attention else 0
    if gradient_checkpointing:
        activations = tokens * h * dtype_bytes * shape.layers + tokens * per_token_layer + scores
    else:
        activations = (tokens * per_token_layer + scores) * shape.layers
    activations *= ACTIVATION_SCALE.get(method, 1.0)
    if method == "orpo":
        logits = tokens * shape.vocab * (dtype_bytes + 12)
    else:
        logits = min(tokens, HEAD_TILE[0]) * min(shape.vocab, HEAD_TILE[1]) * 4 * HEAD_TILES_ALIVE[device]
    generation = 0
    if method == "grpo":  # KV cache of the sampled completions and the logits of one sampling step
        generation = shape.layers * 2 * kv * length * batch * dtype_bytes + batch * shape.vocab * 4
    return MemoryEstimate(int(weights), int(adapter), int(activations), int(logits), int(generation))


def estimate_run(
    cfg: TrainConfig,
    shape: ModelShape,
    gradient_checkpointing: bool,
    device: str = "gpu",
    dtype_bytes: int = 2,
    quadratic_attention: bool = False,
) -> MemoryEstimate:
    """The peak of one process of the run `cfg` (a TrainConfig) at its longest allowed sequences."""
    return estimate(
        shape,
        cfg.method,
        cfg.per_device_train_batch_size,
        cfg.max_length,
        cfg.lora_r,
        cfg.use_qlora,
        dtype_bytes=dtype_bytes,
        gradient_checkpointing=gradient_checkpointing,
        quadratic_attention=quadratic_attention,
        completion_len=cfg.max_completion_length or 64,
        device=device,
        full=cfg.finetune == "full",
    )


def runs_per_gpu(estimate_bytes: int, gpu_bytes: int, margin: float = 0.8, most: int = 8) -> int:
    """How many runs of this size share one GPU under `margin` of its memory (pure; at least 1)."""
    return max(1, min(most, math.floor(margin * gpu_bytes / max(estimate_bytes, 1))))


def launched_placement() -> dict | None:
    """The placement the launcher gave this run's processes; None for a run started by hand."""
    return json_from_env(PLACEMENT_ENV)


def gpu_share() -> float:
    """This process's share of its GPU: below 1 where a sweep packs several runs on one GPU, else 1."""
    return (launched_placement() or {}).get("gpus") or 1.0
