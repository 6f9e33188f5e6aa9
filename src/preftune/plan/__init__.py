"""A memory plan before training: what a run will hold per device, whether it fits, and what would make it fit.

:func:`plan_memory` reads the config and the model's ``config.json`` (no weights: the model is built on
PyTorch's ``meta`` device to count parameters exactly, tied weights once, with the LoRA adapters the config
asks for) and, when given, the training data's token lengths. :func:`format_plan` prints it; ``preftune
plan CONFIG`` and the start of ``preftune train`` show it.

Bytes per device (``P`` parameters, ``T`` trainable: ``P``, or the adapters with LoRA; ``N`` processes),
each line with *when* it is resident:

=====================  ================  ===============================================================
framework              held              CPU: this process's resident memory when the plan is made
                                         (torch, transformers, tokenizer and data loaded, no model yet:
                                         measured, ``VmRSS``); CUDA: 0.25 GiB of cuBLAS/cuDNN workspaces
                                         (the context is outside ``mem_get_info``'s free memory already)
weights                held              4 P (fp32 masters; bf16 exists only inside autocast); + 4 T (LoRA)
optimizer state        held              8 T (AdamW: two fp32 moments)
reference              held              copy (and TR-DPO sync): 4 P; precomputed: its table, 8 B per pair
                                         (16 B with LD-DPO); adapter, none: 0
autocast cache         held              CUDA bf16 only: 2 T (the casts autocast keeps until backward ends)
FSDP gathered          held              fsdp: the root (embeddings, LM head, final norm: R parameters)
                                         and two decoder layers (Λ: the largest), fp32, and those layers'
                                         unsharded gradients: 4 (R + 2 Λ) + 8 Λ. Weights, optimizer state,
                                         a copy reference, the autocast cache and gradients are divided by
                                         N under FSDP (0 on the GPU with CPU offload); DDP holds all of it
                                         on every process (its buckets are views of the gradients).
activations            backward start    tokens · L · α + tokens · 12 h (final norm) [+ shared prompt:
                                         Σ (P + R) · L · 2 kv · 4, the prompt keys/values each rejected
                                         piece concatenates]; with gradient checkpointing tokens · L · 4 h
                                         (each layer's input) + tokens · α (one layer recomputed)
LM head (chunked)      backward start    c · V · 4 (a chunk's fp32 logits, twice with a final soft-cap)
                                         + S · h · 4 (the scored hidden states) + V · h · 4 (the head's
                                         weight gradient, when it is trained); c = min(chunk_size, S), S =
                                         scored response tokens; c = S when S · V · 4 fits
                                         train.keep_logits_mb (no soft-cap): the logits kept for backward
reference forward      backward start    copy / adapter: tokens · (3 h + 3 i) · 4 (one layer's no-grad
                                         working set) + c · V · 4; it runs before backward, so only the
                                         larger of it and the LM head counts
gradients              backward end      4 T (+ V · h · 4: a tied embedding's dense gradient, summed
                                         into the head's)
allocator retention    allocator         CPU only: tokens · L · (ρ α + 4 Σ_lora out), ρ = 0.4 (below)
=====================  ================  ===============================================================

peak = held + max(backward start, backward end) + allocator retention, or the load phase (framework +
weights + the weight files' pages while they are read) or, with ``reference.strategy=precomputed``, the
precompute phase (framework + weights + a reference copy + a no-grad forward of ``reference.batch_size``
pairs) when larger.

``α``, the bytes a Llama-style decoder block saves for backward per token, from the architecture (``h``
hidden, ``i`` MLP width (MoE: experts per token × expert width), ``q`` = heads × head_dim, ``kv`` =
KV heads × head_dim, ``n`` heads):

- fp32 (CPU): ``α = 4 · (6 h + 2 q + 2 kv + n + 4 i)``: each RMSNorm keeps its input, the normalised
  input and the scaled output (3 h, twice); attention keeps the rotated q, k and v (q + 2 kv), its output,
  which ``o_proj`` reads in place (q), and the softmax log-sum-exp (n); the gated MLP keeps gate, up,
  act(gate) and their product (4 i). The padded layout with grouped KV heads adds ``4 · 2 (q − kv)``:
  transformers repeats K/V to every head when a padding mask is given. (Counted with saved-tensor hooks
  on two SmolLM-135M blocks and the final norm: 94.3 KB per token; this formula: 2 α + 12 h = 96.1 KB.)
- bf16 autocast (GPU): ``α = 20 h + 4 q + 4 kv + 4 n + 8 i`` bytes: the residual stream and the norms'
  statistics stay fp32 (4 h + 4 h + a 2 h bf16 output per norm), the matmul inputs and outputs are bf16.
  Not checked on a GPU yet.

``tokens`` is what the layout feeds the decoder for the longest micro-batch (shared prompt: B pairs as
one row of Σ (P + C + R) tokens; padded: 2B rows × the longest row); with data, the longest micro-batch
this run will actually form (every epoch it runs, every rank); without, ``data.max_length``'s upper bound
(shared: B (2 L − 1); padded: 2B × L).

Allocator retention (CPU). glibc serves tensors below its (adaptive, up to 32 MiB) mmap threshold from
its heap and keeps freed heap resident, fragmented between live blocks, so a training process's peak RSS
exceeds its peak of live bytes by a share of what a step allocates and frees: ρ α per token and layer
(every activation is written once in forward and freed in backward; checkpointing frees it in forward
and writes it again), plus with LoRA each adapted layer's freed branch output (4 bytes x its output
width). ρ = 0.4 is fitted on three SmolLM-135M-shape rows (prompt-heavy 512 and 1024, 1024 with
checkpointing: 0.35-0.51 each) and checked on the others in ``bench/plan_check.py``; with
``MALLOC_MMAP_THRESHOLD_`` set (every large tensor mapped and unmapped: peak RSS = peak live bytes) it is 0.

Whether it fits: CPU: ``MemAvailable`` (``/proc/meminfo``; psutil elsewhere) plus what this process holds
already, divided among the processes of this machine under torchrun; CUDA: ``torch.cuda.mem_get_info``'s
free memory. When it does not fit, :attr:`MemoryPlan.advice` lists the cheapest changes in order, each on
top of the previous, until one fits: ``reference.strategy=precomputed``,
``model.gradient_checkpointing=true``, a smaller ``train.batch_size`` (a divisor) with more
``train.grad_accum`` (the same global batch), ``train.parallel=fsdp`` (more than one device),
``model.lora.enabled=true``.

Modules: ``facts`` (the model's architecture and parameter counts from its config, no weights; the
training data's token lengths and the longest micro-batch), ``estimate`` (the bytes of each item above:
:class:`MemoryPlan`), ``advice`` (:func:`plan_memory`: measuring this machine, whether it fits, the
cheapest changes), ``format`` (:func:`format_plan`: the table), ``run`` (:func:`plan_for_run`: the plan
at the start of ``preftune train``), ``units`` (GiB and counts as text).
"""

from __future__ import annotations

from preftune.plan.advice import (
    CUDA_FRAMEWORK_BYTES,
    MEASURE,
    available_memory,
    framework_bytes,
    plan_memory,
)
from preftune.plan.estimate import (
    CPU_RETENTION,
    END,
    HELD,
    RSS,
    START,
    Advice,
    Item,
    MemoryPlan,
    activation_bytes_per_token,
    per_device_host,
)
from preftune.plan.facts import (
    MAX_EPOCHS_SCANNED,
    MicroBatch,
    ModelFacts,
    data_lengths,
    facts_from_model,
    lengths_of,
    longest_micro_batch,
    model_facts,
)
from preftune.plan.format import format_plan
from preftune.plan.run import plan_for_run
from preftune.plan.units import GIB

__all__ = [
    "CPU_RETENTION",
    "CUDA_FRAMEWORK_BYTES",
    "END",
    "GIB",
    "HELD",
    "MAX_EPOCHS_SCANNED",
    "MEASURE",
    "RSS",
    "START",
    "Advice",
    "Item",
    "MemoryPlan",
    "MicroBatch",
    "ModelFacts",
    "activation_bytes_per_token",
    "available_memory",
    "data_lengths",
    "facts_from_model",
    "format_plan",
    "framework_bytes",
    "lengths_of",
    "longest_micro_batch",
    "model_facts",
    "per_device_host",
    "plan_for_run",
    "plan_memory",
]
