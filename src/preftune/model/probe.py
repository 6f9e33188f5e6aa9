"""The setup probe: prove on a tiny forward which fast paths reproduce this model exactly, before training.

A model either gets a fast path exactly or falls back *before the first step*, with the reason; nothing is
assumed from its name. On a few synthetic pairs (random token ids, unequal lengths, one pair longer than a
short sliding window) the probe computes, in fp32 and eval mode:

1. the **naive** response log-probs: the model's own full logits on each pair's two unpadded sequences;
2. the padded layout through the split LM head (:class:`~preftune.model.forward.PaddedLogps`): if it
   differs, the head has a transform we do not reproduce and the run uses full logits; if even the padded
   full-logits batch differs from the unpadded sequences, the model cannot be batched and is refused;
3. the shared-prompt layout, after switching the attention to per-segment routing: it must run, route the
   plan through every decoder layer, and agree with the naive values; otherwise the attention goes back to
   what it was and the run uses padded rows.

"Agree" means ``|got - naive| <= 1e-3 + 1e-4 |naive|`` per sequence sum (fp32 reordering is ~1e-5; the
mistakes this catches — a dropped window, a lost sink, a scale — are 1e-2 and more).

:func:`check_deterministic` runs three training-mode forwards and requires equal results up to fp32
rounding (``1e-5`` relative): every stochastic part (dropout of any name, router jitter) must be off. Not
bitwise: on some CPUs the same GEMM rounds differently from call to call (seen on the 2-vCPU benchmark
machine: the probe's sums 1 ulp apart, 1.53e-5 at ~200 nats), while a random draw moves them by far more.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from preftune.logprobs import sequence_logps
from preftune.model.arch import sharing_refusal, split_lm_head, unwrap_causal_lm
from preftune.model.attention import prepare_shared, restore_attention
from preftune.model.batches import collate_padded, collate_shared
from preftune.model.forward import PaddedLogps, SharedPromptLogps
from preftune.model.loading import ModelError

__all__ = ["ProbeReport", "check_deterministic", "probe_examples", "probe_model"]

#: Training-mode forwards may differ by this (relative, and absolute in nats): ~100 fp32 ulps.
_DETERMINISM_RTOL = 1e-5

_ATOL, _RTOL = 1e-3, 1e-4


@dataclass
class ProbeReport:
    chunked_head: bool
    head_note: str | None  # why full logits
    sharing: bool
    sharing_note: str | None  # why not shared (None when shared, or when not tried)
    attention_layers: int = 0  # layers that routed the shared plan
    max_error: dict[str, float] = field(default_factory=dict)  # layout -> max |got - naive|


def probe_examples(model: nn.Module, *, seed: int = 0) -> list[dict]:
    """Synthetic pairs: unequal lengths, a one-token response, and one pair longer than a short window."""
    lm = unwrap_causal_lm(model)
    vocab = lm.get_input_embeddings().num_embeddings
    shapes = [(6, 5, 3), (2, 4, 7), (3, 1, 2)]
    window = getattr(lm.config, "sliding_window", None)
    if isinstance(window, int) and 0 < window <= 64:
        shapes.append((window + 3, window // 2 + 2, window + 1))
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, (p, c, r) in enumerate(shapes):
        ids = torch.randint(1, vocab, (p + c + r,), generator=g).tolist()
        examples.append(
            {
                "prompt_ids": ids[:p],
                "chosen_ids": ids[p : p + c],
                "rejected_ids": ids[p + c :],
                "weight": 1.0,
                "index": i,
            }
        )
    return examples


def _device(model: nn.Module) -> torch.device:
    return next(unwrap_causal_lm(model).parameters()).device


def _naive(lm: nn.Module, examples: list[dict], device: torch.device) -> Tensor:
    """``[2B]`` log-prob sums from full logits of each unpadded sequence (chosen rows, then rejected)."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]], device=device)  # [1, L]
            mask = torch.zeros_like(ids)
            mask[:, len(ex["prompt_ids"]) :] = 1
            logits = lm(input_ids=ids, use_cache=False).logits
            out.append(sequence_logps(logits, ids, mask)[0])
    return torch.cat(out)


def _error(got: Tensor, ref: Tensor) -> tuple[float, bool]:
    diff = (got.double() - ref.double()).abs()
    ok = bool((diff <= _ATOL + _RTOL * ref.double().abs()).all())
    return float(diff.max()), ok


def _run(module: nn.Module, batch, device: torch.device) -> Tensor:
    return module(**batch.to(device).model_inputs())[0]


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def probe_model(
    model: nn.Module, *, try_sharing: bool, chunk_size: int, pad_token_id: int = 0
) -> ProbeReport:
    """Which layouts reproduce the naive log-probs of ``model`` (see the module docstring)."""
    lm = unwrap_causal_lm(model)
    device = _device(model)
    examples = probe_examples(model)
    report = ProbeReport(chunked_head=False, head_note=None, sharing=False, sharing_note=None)
    with _mode(model, False):
        naive = _naive(lm, examples, device)
        padded = collate_padded(examples, pad_token_id)
        full, ok = _error(_run(PaddedLogps(model, chunk_size=chunk_size, chunked_head=False), padded, device), naive)  # fmt: skip
        report.max_error["padded_full_logits"] = full
        if not ok:
            raise ModelError(
                f"{type(lm).__name__} gives different log-probs for a padded batch than for single "
                f"sequences (max error {full:.3g}): it cannot be trained in batches"
            )
        if split_lm_head(model) is None:
            report.head_note = "the LM head is not a plain linear projection"
        else:
            try:
                chunked = _run(PaddedLogps(model, chunk_size=chunk_size), padded, device)
                err, ok = _error(chunked, naive)
                report.max_error["padded"] = err
                if ok:
                    report.chunked_head = True
                else:
                    report.head_note = (
                        f"the split LM head differs from the model's logits by {err:.3g}"
                    )
            except (RuntimeError, ValueError, TypeError, AttributeError) as e:
                report.head_note = f"the split LM head failed ({_short(e)})"
        if not try_sharing:
            return report
        why = sharing_refusal(model)
        if why is None and not report.chunked_head:
            why = "the shared layout needs the split LM head"
        if why is None:
            try:
                prepare_shared(model)
                module = SharedPromptLogps(model, chunk_size=chunk_size, attention_layers=0)
                batch = collate_shared(examples, pad_token_id).to(device)
                out = module(**batch.model_inputs())[0]
                routed = module.last_routed
                expected = int(getattr(lm.config, "num_hidden_layers", 0) or 1)
                err, ok = _error(out, naive)
                report.max_error["shared_prompt"] = err
                if routed < expected:
                    why = f"only {routed} of {expected} layers route attention through transformers' AttentionInterface"
                elif not ok:
                    why = f"per-segment attention differs from the model by {err:.3g}"
                else:
                    report.sharing, report.attention_layers = True, routed
            except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as e:
                why = f"per-segment attention failed ({_short(e)})"
            if not report.sharing:
                restore_attention(model)
        report.sharing_note = why
    return report


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


@torch.no_grad()
def check_deterministic(model: nn.Module, *, chunk_size: int, pad_token_id: int = 0) -> None:
    """Training-mode forwards under different RNG seeds must agree (to fp32 rounding, module docstring);
    else a :class:`ModelError`.

    Different seeds make any random draw (dropout masks, router jitter, layer drop) differ; three runs
    make a rare event (a layer dropped with small probability) unlikely to hide. The caller's RNG state
    is restored, so the probe does not change the run's random stream.
    """
    device = _device(model)
    batch = collate_padded(probe_examples(model, seed=1), pad_token_id)
    module = PaddedLogps(model, chunk_size=chunk_size, chunked_head=False)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _mode(model, True):
        outs = []
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            outs.append(_run(module, batch, device))
    for other in outs[1:]:
        if not torch.allclose(outs[0], other, rtol=_DETERMINISM_RTOL, atol=_DETERMINISM_RTOL):
            diff = float((outs[0] - other).abs().max())
            raise ModelError(
                f"{type(unwrap_causal_lm(model)).__name__} is still random in training mode after "
                f"dropout was switched off (forwards differ by {diff:.3g}); set model.dropout=true to "
                "train with its noise deliberately"
            )
