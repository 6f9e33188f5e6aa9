"""The bytes of each item of a memory plan: the formulas of the package docstring (:mod:`preftune.plan`,
where each term is derived), per device, for one config, model and longest micro-batch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from preftune.config import Config, resolved_reference_strategy
from preftune.logprobs import keeps_logits
from preftune.plan.facts import MicroBatch, ModelFacts, longest_micro_batch
from preftune.plan.units import _count, _gib

#: CPU only: resident heap glibc keeps per activation byte a step allocates (the package docstring).
CPU_RETENTION = 0.4


def activation_bytes_per_token(facts: ModelFacts, *, precision: str, padded: bool) -> int:
    """``α``: bytes one decoder layer saves for backward per token (see the package docstring, :mod:`preftune.plan`)."""
    h, i, q, kv, n = facts.hidden, facts.intermediate, facts.q_width, facts.kv_width, facts.heads
    repeat = 2 * (q - kv) if padded and q > kv else 0
    if precision == "fp32":
        return 4 * (6 * h + 2 * q + 2 * kv + n + 4 * i + repeat)
    return 20 * h + 4 * q + 4 * kv + 4 * n + 8 * i + 2 * repeat


#: When an item is resident: all step long, at the start of backward (the larger of the LM head and the
#: reference forward counts, beside the activations), at the end of backward, or as CPU heap retention.
HELD, START, END, RSS = "held", "backward start", "backward end", "allocator"


@dataclass
class Item:
    name: str
    bytes: int
    how: str
    when: str = HELD


@dataclass
class Advice:
    change: str  # the overrides, e.g. "reference.strategy=precomputed"
    total: int  # the plan's peak with this change and every one before it
    fits: bool


@dataclass
class MemoryPlan:
    """Per device (one process). ``total`` is the peak; ``fits`` is None when nothing was measured."""

    facts: ModelFacts
    batch: MicroBatch
    device: str  # cpu | cuda | mps
    precision: str  # fp32 | bf16
    parallel: str  # none | ddp | fsdp
    world_size: int
    layout: str  # shared_prompt | padded
    layout_known: bool  # decided by the setup probe (else predicted from the config)
    reference: str
    gradient_checkpointing: bool
    lora: bool
    items: list[Item]
    phases: dict[str, int]
    total: int
    available: int | None = None
    available_how: str = ""
    processes_here: int = 1
    fits: bool | None = None
    advice: list[Advice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _precision(cfg: Config, device: str) -> str:
    dtype = cfg.model.dtype
    if dtype == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return "fp32" if dtype == "float32" else "bf16"


def _device_kind(cfg: Config, device: str | None) -> str:
    if device is not None:
        return device.split(":")[0]
    wanted = cfg.train.device
    if wanted != "auto":
        return wanted.split(":")[0]
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def _arithmetic(
    cfg: Config,
    facts: ModelFacts,
    lengths,
    layout: str | None,
    world: int,
    kind: str,
    baseline: int,
) -> MemoryPlan:
    # as preftune.distributed.resolve_parallel (not imported: it pulls in torch.distributed)
    parallel = (
        "none" if world <= 1 else ("ddp" if cfg.train.parallel == "auto" else cfg.train.parallel)
    )
    precision = _precision(cfg, kind)
    layout_known = layout is not None
    notes: list[str] = []
    if layout is None:
        layout = (
            "padded" if cfg.train.prefix_sharing is False or facts.sharing_note else "shared_prompt"
        )
        if facts.sharing_note and cfg.train.prefix_sharing is not False:
            notes.append(f"prompt not shared: {facts.sharing_note}")
    padded = layout == "padded"
    strategy = resolved_reference_strategy(cfg)
    lora = cfg.model.lora.enabled
    gc = cfg.model.gradient_checkpointing
    batch = longest_micro_batch(cfg, layout, lengths, world_size=world)

    P, T = facts.params, (facts.lora_params if lora else facts.params)
    h, V, L = facts.hidden, facts.vocab, facts.layers
    a = 4 if precision == "fp32" else 2  # bytes of a matmul activation
    fsdp = parallel == "fsdp"
    shard = world if fsdp else 1
    offload = fsdp and cfg.train.fsdp_cpu_offload and kind == "cuda"

    def per_device(n_bytes: int) -> int:
        return 0 if offload else -(-n_bytes // shard)

    items: list[Item] = []

    def add(name: str, n: int, how: str, when: str = HELD) -> None:
        items.append(Item(name, int(n), how, when))

    if kind == "cuda":
        add("framework", baseline, "cuBLAS/cuDNN workspaces (the context is outside free memory)")
    else:
        add("framework", baseline, "this process before the model loads (torch, data, tokenizer)")
    div = f" / {shard}" if fsdp else ""
    where = " (CPU offload)" if offload else div
    weights = 4 * (P + (T if lora else 0))
    adapters = " + LoRA adapters" if lora else ""
    add("weights", per_device(weights), f"4 B x {_count(P)} fp32{adapters}{where}")
    add("optimizer state", per_device(8 * T), f"AdamW: 8 B x {_count(T)} trainable{where}")
    n_pairs = len(lengths) if lengths is not None else 0
    if strategy == "copy":
        ref_bytes, how = per_device(4 * P), f"a frozen fp32 copy: 4 B x {_count(P)}{where}"
        if cfg.reference.sync.mode != "none":
            how += " (TR-DPO syncs it)"
    elif strategy == "precomputed":
        width = 16 if cfg.loss.ld_alpha is not None else 8
        ref_bytes, how = width * n_pairs, f"the log-prob table: {width} B x {n_pairs} pairs"
    else:
        ref_bytes = 0
        how = "the policy with its adapters off" if strategy == "adapter" else "no reference"
    add("reference", ref_bytes, how)
    if precision == "bf16" and kind == "cuda":
        add("autocast cache", per_device(2 * T), f"bf16 casts: 2 B x {_count(T)} trainable{div}")
    if fsdp:
        gathered = 4 * (facts.root_params + 2 * facts.layer_params) + 4 * 2 * facts.layer_params
        add("FSDP gathered", gathered, "root + 2 decoder layers, fp32, and their gradients")

    alpha = activation_bytes_per_token(facts, precision=precision, padded=padded)
    tokens = batch.tokens
    final_norm = tokens * (12 if precision == "fp32" else 10) * h
    if gc:
        acts = tokens * L * 4 * h + tokens * alpha + final_norm
        how = f"checkpointed: {tokens} tokens x {L} layers x 4h + one layer recomputed"
    else:
        acts = tokens * L * alpha + final_norm + batch.rejected_kv * L * 2 * facts.kv_width * a
        how = f"{tokens} tokens x {L} layers x α = {alpha} B"
        if batch.rejected_kv:
            how += " + the rejected pieces' prompt K/V"
    add("activations", acts, how, START)
    chunk = min(cfg.train.chunk_size, max(batch.scored, 1))
    kept = keeps_logits(
        batch.scored,
        V,
        keep_bytes=cfg.train.keep_logits_mb * 2**20,
        softcap=bool(facts.logit_softcap),
    )
    rows = max(batch.scored, 1) if kept else chunk
    trained_head = not lora
    head = rows * V * 4 * (2 if facts.logit_softcap else 1) + batch.scored * h * 4
    head += V * h * 4 if trained_head else 0
    add(
        "LM head (chunked)",
        head,
        f"{rows} x {V} fp32 {'logits kept for backward' if kept else 'logits'}, "
        f"{batch.scored} scored states" + (", the head's weight gradient" if trained_head else ""),
        START,
    )
    if strategy in ("copy", "adapter"):
        ref_fwd = tokens * (3 * h + 3 * facts.intermediate) * a + chunk * V * 4
        add("reference forward", ref_fwd, "no grad: one layer's working set, a head chunk", START)
    grads = per_device(4 * T)
    how = f"4 B x {_count(T)} trainable{where}"
    if trained_head and facts.tied:
        grads += V * h * 4
        how += " + the tied embedding's dense gradient"
    add("gradients", grads, how, END)
    retention = 0
    if kind == "cpu" and not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        lora_width = facts.lora_out_width if lora else 0
        retention = int(tokens * L * (CPU_RETENTION * alpha + a * lora_width))
        how = f"glibc keeps freed heap: {tokens} tokens x {L} layers x {CPU_RETENTION:g} α"
        add("allocator retention", retention, how + (" + LoRA outputs" if lora_width else ""), RSS)

    held = sum(it.bytes for it in items if it.when == HELD)
    start_bytes = sum(it.bytes for it in items if it.when == START and it.name == "activations")
    start_bytes += max((it.bytes for it in items if it.when == START and it.name != "activations"),
                       default=0)  # fmt: skip
    end_bytes = sum(it.bytes for it in items if it.when == END)
    phases = {"train": held + max(start_bytes, end_bytes) + retention}
    phases["load"] = baseline + per_device(4 * P) + (facts.file_bytes if kind != "cuda" else 0)
    if strategy == "precomputed":
        ref_batch = longest_micro_batch(
            cfg, layout, lengths, batch_size=cfg.reference.batch_size, by_length=True
        )
        fwd = ref_batch.tokens * (3 * h + 3 * facts.intermediate) * a
        fwd += min(cfg.train.chunk_size, max(ref_batch.scored, 1)) * V * 4
        phases["precompute"] = baseline + per_device(weights) + per_device(4 * P) + fwd
    total = max(phases.values())
    if fsdp:
        notes.append(f"each process first loads the whole model in host RAM: 4 B x {_count(P)}")
    if offload:
        notes.append(
            f"CPU offload: weights, gradients and optimizer state ({_gib(per_device_host(weights, T, shard))}"
            " GiB per process) live in host RAM"
        )
    return MemoryPlan(
        facts=facts,
        batch=batch,
        device=kind,
        precision=precision,
        parallel=parallel,
        world_size=world,
        layout=layout,
        layout_known=layout_known,
        reference=strategy,
        gradient_checkpointing=gc,
        lora=lora,
        items=items,
        phases=phases,
        total=total,
        notes=notes,
    )


def per_device_host(weights: int, trainable: int, shard: int) -> int:
    return -(-(weights + 12 * trainable) // shard)
