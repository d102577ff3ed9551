"""GPU memory of the training phase, as pure functions of sizes and precision (no torch, no model).

Symbols: P parameters of the model being trained, P₀ of the dense teacher, w bytes per weight
(``model.dtype``), c bytes per autocast activation (2 under ``train.mixed_precision`` bf16/fp16,
else w), r = w bytes of the residual stream, N GPUs, T = batch_size × seq_len tokens per micro-batch,
V vocabulary, L decoder layers; one layer has hidden size h, a query heads and k KV heads of head_dim
d, and f MLP neurons.

**Static memory (per GPU).** Weights P·w, gradients P·w (torch keeps them in the parameter dtype),
AdamW's two moments 2·P·w (``exp_avg``/``exp_avg_sq`` in the parameter dtype: fp32 weights are the
master copy, so bf16 training needs no extra master), and under autocast with w > c one cast copy of
every weight, P·c (autocast caches the casts of leaf weights until the forward ends; without
checkpointing backward keeps them). DDP adds its gradient buckets, P·w (accelerate's default
``gradient_as_bucket_view=False``). FSDP (FULL_SHARD) divides weights, gradients and moments by N
and instead holds the gathered units: the root (embeddings, final norm) and two decoder layers
(one computing, one prefetched), in compute precision, with their gradients, (P_root + 2·P_layer)·(c + w).
The ``distill`` teacher is a frozen copy of the dense model, P₀·t with t the bytes of
``train.distill.teacher_dtype`` (``auto`` is planned as bf16, t = 2: the GPUs planned for compute it
natively); on one GPU and under DDP every GPU holds all of it, under FSDP it is sharded like the student
(``trainers/sharding.shard_teacher``): P₀·t/N plus its gathered units, (P_root + 2·P_layer)·t, taken
from the dense model. AdamW steps with the fused CUDA kernel, in
place: no step temporary (torch's default foreach implementation would allocate sqrt(v̂) for every
parameter at once, one more P·w/N). The training peak is

    weights + gradients + AdamW + buckets + gathered + teacher + copies + activations.

Under ``train.trainer: lora`` gradients, AdamW state and buckets count only the adapter parameters,
r·(in + out) per adapted linear. A stage that starts with surgery also holds the previous model's AdamW
state (kept by name) while it is sliced into the new one, one parameter at a time (``transition_bytes``);
under FSDP that surgery gathers the full weights on every rank (into host memory where the step runs only
layer forwards on the GPU, ``pruning.staging``), while the old moments stay sharded and are gathered,
sliced and re-sharded one parameter at a time.

**Activations of one Llama-style decoder layer (bytes per token)**, derived by listing what autograd
saves in Hugging Face's ``LlamaDecoderLayer`` with SDPA (flash / memory-efficient kernels: no T×T
scores are stored) under autocast, and checked exactly against ``torch.autograd.graph.saved_tensors_hooks``
byte counts on tiny Llama (fp32, bf16, fp32 + bf16 autocast, checkpointed), Qwen2 and Mistral models
(``tests/test_plan.py``)::

    A = 2·(4 + r)·h + 8      two RMSNorms: the input in fp32 (saved by pow and mul), the normalised
                             product in the stream's dtype (saved by the weight mul), the fp32 rsqrt
      + readers               inputs of q/k/v and gate/up: 5·c·h when autocast casts them (c < r),
                              one shared norm output per norm, 2·r·h, otherwise
      + c·(a·d + 2·k·d)       q, k, v as the attention kernel saves them (after RoPE)
      + c·a·d + 4·a           attention output (also o_proj's input: the kernel's layout needs no copy)
                              and its fp32 log-sum-exp per head
      + 4·c·f                 SwiGLU: gate output, SiLU output, up output, their product (down_proj input)

Korthikanti et al. 2022 (arXiv 2205.05198, eq. 2) give 34·h + 5·a·T per token for a GPT layer in
16-bit with dropout and stored attention scores; ours has no dropout, no T² term (SDPA) and SwiGLU.
The model also saves, once, the final norm and LM-head input: (4 + r)·h + 4 + (c if c < r else r)·h
+ 8 (the token ids).

**The loss** (``loss_bytes``). Unfused (``train.loss_chunk_tokens: 0``) it adds Λ·V bytes per token: fp32
logits, a contiguous copy, the log-softmax and its gradient; Λ = 12 for the LM loss, 26 for distillation
(student and teacher log-softmax and the KL terms), measured on CPU with ``torch.profiler`` through the
real trainers' ``compute_loss`` + backward (12.3 and 26.3 bytes at V = 32,000). Fused and chunked
(``trainers/head_loss.py``, the default) it holds one chunk of C tokens, Λ_chunk·V bytes per chunk token
(Λ_chunk = 8 for the LM loss, 16 for distillation: at most two and four fp32 (C, V) buffers, plus the
c-byte logits under autocast), the fp32 accumulator of the head's weight gradient, 4·V·h, the head's
autocast copy, c·V·h, and the gradient with respect to the hidden states, T·h·r. ``tests/test_head_loss.py``
checks the drop from one to the other against a step's peak counted at every op on CPU.

**Gradient checkpointing** (``train.gradient_checkpointing``, non-reentrant) keeps only each layer's
input, r·h per token (measured likewise), and recomputes one layer at a time in backward, so

    no checkpointing:  T·(L·A + head) + loss
    checkpointing:     T·(L·r·h + head) + max(loss, T·A)

(the loss's buffers are freed before the first layer is recomputed). Activations are computed for
the dense geometry, an upper bound for every pruned stage. Not counted: the CUDA context, cuBLAS
workspaces and allocator fragmentation, hence the usable fraction ``HEADROOM`` of the GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOSS_BYTES_PER_LOGIT = {"lm": 12, "distill": 26}  # Λ above: bytes per (token, vocabulary entry)
CHUNK_BYTES_PER_LOGIT = {"lm": 8, "distill": 16}  # Λ_chunk: the fused loss's fp32 buffers per chunk token
HEADROOM = 0.9  # usable share of a GPU's memory: the rest is CUDA context, workspaces, fragmentation
GIB = 2**30
MODES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class Precision:
    """Bytes per weight (w, also the residual stream r) and per autocast activation (c)."""

    weight_bytes: int
    compute_bytes: int

    @classmethod
    def of(cls, dtype: str, mixed_precision: str) -> Precision:
        """``model.dtype`` and ``train.mixed_precision`` as byte sizes."""
        w = DTYPE_BYTES[dtype]
        return cls(w, 2 if mixed_precision in ("bf16", "fp16") else w)

    @property
    def casts(self) -> bool:
        """Whether autocast makes lower-precision copies (activations and weights)."""
        return self.compute_bytes < self.weight_bytes


@dataclass(frozen=True)
class LayerGeometry:
    """Sizes of one decoder layer (the dense model's: an upper bound for every pruned stage)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def layer_activation_bytes(g: LayerGeometry, p: Precision) -> int:
    """A: bytes autograd keeps per token for one decoder layer (module docstring)."""
    r, c, h = p.weight_bytes, p.compute_bytes, g.hidden
    norms = 2 * (4 + r) * h + 2 * 4
    readers = 5 * c * h if p.casts else 2 * r * h
    attention = c * (g.heads * g.head_dim + 2 * g.kv_heads * g.head_dim) + c * g.heads * g.head_dim + 4 * g.heads
    return norms + readers + attention + 4 * c * g.intermediate


def head_activation_bytes(hidden: int, p: Precision) -> int:
    """Bytes per token saved once per model: final norm, LM-head input, token ids."""
    r = p.weight_bytes
    return (4 + r) * hidden + 4 + (p.compute_bytes if p.casts else r) * hidden + 8


def loss_bytes(tokens: int, vocab: int, hidden: int, p: Precision, distill: bool, chunk_tokens: int) -> int:
    """Bytes the loss holds at its peak for one micro-batch (module docstring, "The loss").

    Unfused (``chunk_tokens`` 0): Λ·V per token. Fused (``trainers/head_loss.py``): one chunk's buffers,
    Λ_chunk·V per chunk token (plus the compute-dtype logits under autocast), the fp32 accumulator of the
    head's weight gradient, 4·V·h, its compute-dtype copy of the head (autocast), and the stored gradient
    with respect to the hidden states, T·h·r."""
    kind = "distill" if distill else "lm"
    if chunk_tokens <= 0:
        return tokens * LOSS_BYTES_PER_LOGIT[kind] * vocab
    cast = p.compute_bytes if p.casts else 0
    chunk = min(chunk_tokens, tokens) * (CHUNK_BYTES_PER_LOGIT[kind] + cast) * vocab
    return chunk + (4 + cast) * vocab * hidden + tokens * hidden * p.weight_bytes


def activation_bytes(
    tokens: int,
    layers: int,
    g: LayerGeometry,
    vocab: int,
    p: Precision,
    checkpointing: bool,
    distill: bool,
    chunk_tokens: int = 0,
) -> int:
    """Peak activation bytes of one micro-batch of ``tokens`` tokens (module docstring)."""
    loss = loss_bytes(tokens, vocab, g.hidden, p, distill, chunk_tokens)
    layer = layer_activation_bytes(g, p)
    head = head_activation_bytes(g.hidden, p)
    if checkpointing:
        return tokens * (layers * p.weight_bytes * g.hidden + head) + max(loss, tokens * layer)
    return tokens * (layers * layer + head) + loss


@dataclass(frozen=True)
class Footprint:
    """Bytes one GPU holds while training one stage; ``peak`` is what must fit."""

    weights: int
    gradients: int
    adamw: int
    autocast_copies: int
    ddp_buckets: int
    fsdp_gathered: int
    teacher: int
    activations: int
    optimizer_step: int  # AdamW's step temporary: 0 with the fused kernel (kept as a row of the table)
    transition: int  # surgery: new weights + the old (held) and new (sliced) AdamW state + teacher

    @property
    def training(self) -> int:
        """Held throughout, plus the larger of forward/backward (casts, activations) and the optimizer step."""
        held = self.weights + self.gradients + self.adamw + self.ddp_buckets + self.fsdp_gathered + self.teacher
        return held + max(self.autocast_copies + self.activations, self.optimizer_step)

    @property
    def peak(self) -> int:
        return max(self.training, self.transition)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "training": self.training, "peak": self.peak}


@dataclass(frozen=True)
class StageSizes:
    """Parameter counts one stage's memory depends on."""

    trained: int  # the model this stage trains (after its pruning)
    trainable: int  # parameters with gradients and AdamW state (``trained``; the adapters under LoRA)
    before: int  # parameters before this stage's surgery (0: the stage starts without surgery)
    carried: bool  # whether AdamW state is carried through the surgery (train.optim.after_surgery: carry)
    teacher: int  # dense parameters of the distillation teacher (0: no teacher)
    gathered: int  # parameters FSDP holds unsharded at once (root + two decoder layers)
    teacher_bytes: int = 0  # bytes per teacher weight (train.distill.teacher_dtype); 0: the model's w
    layer: int = 0  # parameters of the largest decoder layer (the surgery's transient slice)
    on_host: bool = False  # FSDP: the pruning step runs on a host copy, layers staged to the GPU (pruning.staging)


def footprint(sizes: StageSizes, activations: int, p: Precision, mode: str, gpus: int) -> Footprint:
    """Per-GPU bytes of one stage under ``mode`` ('single', 'ddp' or 'fsdp' over ``gpus``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    w = p.weight_bytes
    shard = gpus if mode == "fsdp" else 1
    gradients = math.ceil(sizes.trainable * w / shard)
    return Footprint(
        weights=math.ceil(sizes.trained * w / shard),
        gradients=gradients,
        adamw=2 * gradients,
        autocast_copies=sizes.trained * p.compute_bytes if p.casts and mode != "fsdp" else 0,
        ddp_buckets=sizes.trainable * w if mode == "ddp" and gpus > 1 else 0,
        fsdp_gathered=sizes.gathered * (p.compute_bytes + w) if mode == "fsdp" else 0,
        teacher=teacher_bytes(sizes, w, mode, gpus),
        activations=activations,
        optimizer_step=0,  # fused AdamW on CUDA updates in place (trainers/base.adamw_for)
        transition=transition_bytes(sizes, w, mode, gpus),
    )


def teacher_bytes(sizes: StageSizes, w: int, mode: str, gpus: int) -> int:
    """Bytes of the frozen teacher per GPU: all of it, or under FSDP its shard plus its gathered units."""
    t = sizes.teacher_bytes or w
    if not sizes.teacher:
        return 0
    if mode == "fsdp":
        return math.ceil(sizes.teacher * t / gpus) + sizes.gathered * t
    return sizes.teacher * t


def transition_bytes(sizes: StageSizes, w: int, mode: str, gpus: int) -> int:
    """Bytes during the surgery that starts a stage (0 when it has none).

    The model before surgery, P_before·w, the teacher, and with carried state the old AdamW moments
    (kept by name), 2·P_before·w, plus one parameter's sliced moments at a time: the carry frees each old
    moment as its slice is placed (``optim_state.carry_optimizer_state(consume=True)``), bounded here by
    one decoder layer, 2·P_layer·w. Under FSDP (``trainers/sharding.py``) the full weights are gathered on
    every rank, one parameter at a time, and the old moments stay sharded, 2·P_before·w/N, each gathered,
    sliced and re-sharded one parameter at a time (2·P_layer·w). Re-sharding the pruned model is the peak:
    accelerate keeps its full weights referenced until every unit is sharded while ``fully_shard``
    allocates the shards and FSDP2's buffers, together at most a second model, 2·P_before·w
    (``tests/fsdp_surgery_script.py`` measures it). Where the step runs on a host copy of the model
    (``pruning.staging``, ``on_host``) the GPU holds instead the new shards P·w/N, the moments' shards, one
    parameter's full moments, and one FSDP unit unsharded, (P_root + 2·P_layer)·w: the decoder layer
    running during the step, or the unit ``fully_shard`` is moving from the host while it re-shards.
    """
    if not sizes.before:
        return 0
    trainable_before = sizes.before if sizes.trainable == sizes.trained else 0
    moments = 2 * trainable_before * w if sizes.carried else 0
    one_parameter = 2 * sizes.layer * w if sizes.carried else 0
    if mode == "fsdp" and sizes.on_host:
        shards = math.ceil(sizes.trained * w / gpus) + math.ceil(moments / gpus)
        return shards + one_parameter + sizes.gathered * w + teacher_bytes(sizes, w, mode, gpus)
    if mode == "fsdp":
        return 2 * sizes.before * w + math.ceil(moments / gpus) + one_parameter + teacher_bytes(sizes, w, mode, gpus)
    return sizes.before * w + moments + one_parameter + teacher_bytes(sizes, w, mode, gpus)


def fits(peak_bytes: int, gpu_gib: float) -> bool:
    """Whether a peak fits the usable ``HEADROOM`` share of a GPU of ``gpu_gib`` GiB."""
    return peak_bytes <= HEADROOM * gpu_gib * GIB
