"""Sequence log-probabilities of responses: the one place where the label shift lives.

Shift convention (docs/FORMULAS.md, "Sequence log-probs")
---------------------------------------------------------
The logits at position ``t`` predict token ``t + 1``. So the predictions are ``logits[:, :-1]``, their labels
are ``input_ids[:, 1:]`` and the mask that says which predictions count is shifted **with the labels**:
``completion_mask[:, 1:]``. ``completion_mask[b, t] = 1`` marks ``input_ids[b, t]`` as a response token (EOS
included); prompt and padding positions are 0. Position 0 is never scored. A row's ``logps`` is the sum of
``log π(y_t | x, y_<t)`` over its response tokens and ``n_tokens`` their count. Whatever sits in ``input_ids``
where the mask is 0 (``-100``, a pad id, junk) never reaches ``gather``: those labels are replaced by 0 first.

Memory rationale
----------------
A full fp32 ``[B, T, V]`` log-softmax is 15.7 GiB at 16 x 2048 tokens x 128k vocab, and autograd keeps
several tensors of that size alive for backward. :func:`chunked_sequence_logps` never builds it: it projects
only the response positions through the LM head, in chunks of ``chunk_size`` tokens, computes
``logit[label] - logsumexp(logits)`` per chunk in fp32 and keeps only one number per token (plus the
log-sum-exp). Backward recomputes each chunk's logits from the saved hidden states and accumulates the
gradients of the hidden states, the LM-head weight and bias. The largest temporary is one ``chunk x V`` fp32
buffer (two with a soft-cap), in forward and in backward alike. When gradients are needed and the whole
``N x V`` fits ``keep_bytes`` (``train.keep_logits_mb``), forward keeps every token's logits instead,
and backward starts from them: one LM-head GEMM less per step (the same gradients), for ``N x V`` fp32
held from forward to backward. :func:`sequence_logps` is the plain
reference implementation from full logits, used by tests and for models whose head cannot be split off.

Logit transform (as in HF models): ``logits = (h @ W.T + b) * logit_scale``, then
``logit_softcap * tanh(logits / logit_softcap)`` when a soft-cap is set.

Dtypes: the maths runs in fp32 whatever the input dtype (bf16 hidden states are upcast one chunk at a time,
a bf16 LM-head weight once per call); float64 inputs are computed in float64 (for gradcheck). Gradients come
back in the inputs' dtypes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "chunked_sequence_logps",
    "keeps_logits",
    "segment_sum",
    "selected_token_logps",
    "sequence_logps",
    "token_log_collision",
]

#: Tokens per LM-head chunk. 1024 x 32k vocab is a 128 MiB fp32 buffer; 1024 x 128k is 512 MiB.
DEFAULT_CHUNK_SIZE = 1024


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or float64 when any input is float64 (never below fp32)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def keeps_logits(
    n_tokens: int, vocab: int, *, keep_bytes: int, softcap: bool, itemsize: int = 4
) -> bool:
    """Whether :func:`selected_token_logps` keeps all ``n_tokens x vocab`` logits (``itemsize`` bytes each)
    for backward: they fit ``keep_bytes`` and there is no soft-cap (whose backward needs ``tanh`` too).
    The memory plan asks the same question."""
    return not softcap and n_tokens * vocab * itemsize <= keep_bytes


def sequence_logps(
    logits: Tensor, input_ids: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the response tokens from full logits (the reference implementation).

    Args:
        logits: ``[B, T, V]`` model outputs (any float dtype; the log-softmax runs in fp32).
        input_ids: ``[B, T]`` token ids; any value (``-100``, pad id) is allowed where the mask is 0.
        completion_mask: ``[B, T]``, nonzero where ``input_ids`` is a response token.

    Returns:
        ``(logps [B] fp32, n_tokens [B] int64)``: per row, the sum of ``log π(input_ids[t] | <t)`` over
        response positions ``t >= 1`` and the number of such positions.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2] or completion_mask.shape != logits.shape[:2]:
        raise ValueError(
            "input_ids and completion_mask must be [B, T] matching logits [B, T, V]: got logits "
            f"{tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"completion_mask {tuple(completion_mask.shape)}"
        )
    logits = logits[:, :-1].to(_compute_dtype(logits))  # [B, T-1, V]; position t predicts t+1
    labels = input_ids[:, 1:]  # [B, T-1]
    mask = completion_mask[:, 1:].bool()  # shifted with the labels
    safe_labels = labels.masked_fill(~mask, 0).long()  # -100 / junk never reaches gather
    selected = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    token_logps = selected - torch.logsumexp(logits, dim=-1)
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    return token_logps.sum(-1), mask.sum(-1, dtype=torch.int64)


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """``out[s] = sum(values[i] for i where segment_ids[i] == s)``, differentiable; ``out`` is ``[num_segments]``.

    ``index_add`` adds one value at a time, so an fp32 accumulator drifts by ~1e-4 nats over a few hundred
    tokens (``torch.sum`` reduces pairwise and does not); the sum is therefore taken in float64.
    """
    out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    return out.index_add(0, segment_ids, values.double()).to(values.dtype)


def _validate_head_args(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logit_scale: float,
    logit_softcap: float | None,
    chunk_size: int,
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden states {tuple(hidden.shape)} vs lm_head_weight "
            f"{tuple(weight.shape)} (expected [..., H] and [V, H])"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"lm_head_bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}"
        )
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a float, got {logit_scale!r}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if logit_softcap is not None and (
        isinstance(logit_softcap, bool)
        or not isinstance(logit_softcap, (int, float))
        or not (math.isfinite(logit_softcap) and logit_softcap > 0)
    ):
        raise ValueError(
            f"logit_softcap must be None (no soft-cap) or a finite number > 0, got {logit_softcap!r}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _chunk_logits(
    out: Tensor, h: Tensor, weight_t: Tensor, bias: Tensor | None, scale: float
) -> Tensor:
    """``out <- (h @ W.T + b) * scale`` in one GEMM call, without any other ``chunk x V`` temporary."""
    if bias is not None:
        return torch.addmm(bias, h, weight_t, beta=scale, alpha=scale, out=out)
    if scale == 1.0:
        return torch.mm(h, weight_t, out=out)
    return out.addmm_(h, weight_t, beta=0.0, alpha=scale)  # beta=0: out's old contents are ignored


class _SelectedTokenLogps(torch.autograd.Function):
    """``logp[i] = z[i, labels[i]] - logsumexp(z[i])`` with ``z`` the transformed logits of ``hidden[i]``.

    Forward and backward both walk over chunks of rows; backward recomputes each chunk's logits, unless
    forward kept them all (``keep``, decided by :func:`keeps_logits`).
    With ``c`` the soft-cap and ``t = tanh(s * u / c)`` (``u = h W^T + b``, ``s`` the scale):
    ``d logp / d z = onehot - softmax(z)`` and ``d z / d u = s * (1 - t^2)`` (``s`` without a soft-cap).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, logit_scale, logit_softcap, chunk_size, keep):
        dtype = _compute_dtype(hidden, weight, bias)
        n, vocab = hidden.shape[0], weight.shape[0]
        weight_t = weight.to(dtype).t()  # [H, V] view (a copy only for bf16/fp16 weights)
        bias_c = None if bias is None else bias.to(dtype)
        token_logps = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        # keep: every token's logits stay for backward (the exp goes to a chunk buffer); else one chunk
        # buffer holds the logits and then, in place, their exp.
        m = min(chunk_size, n)
        buf = torch.empty(n if keep else m, vocab, dtype=dtype, device=hidden.device)
        work = torch.empty(m, vocab, dtype=dtype, device=hidden.device) if keep else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(dtype)
            out = buf[start:end] if keep else buf[: end - start]
            if logit_softcap is None:
                z = _chunk_logits(out, h, weight_t, bias_c, logit_scale)
            else:  # c * tanh(s * u / c), same rounding as in backward
                z = _chunk_logits(out, h, weight_t, bias_c, logit_scale / logit_softcap)
                z.tanh_().mul_(logit_softcap)
            selected = z.gather(1, labels[start:end].unsqueeze(1)).squeeze(1)
            # In-place logsumexp: z <- exp(z - max), no second chunk x V buffer (unless z is kept).
            zmax = z.amax(dim=1, keepdim=True)
            e = torch.sub(z, zmax, out=work[: end - start]) if keep else z.sub_(zmax)
            chunk_lse = e.exp_().sum(dim=1).log_().add_(zmax.squeeze(1))
            lse[start:end] = chunk_lse
            token_logps[start:end] = selected - chunk_lse
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.kept = buf if keep else None
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        scale, softcap, chunk_size = ctx.logit_scale, ctx.logit_softcap, ctx.chunk_size
        kept, ctx.kept = ctx.kept, None  # [N, V] logits from forward, or None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        weight_c = weight.to(dtype)  # [V, H]
        bias_c = None if bias is None else bias.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b else None
        m = min(chunk_size, n)
        buf = None if kept is not None else torch.empty(m, vocab, dtype=dtype, device=hidden.device)
        tbuf = (
            torch.empty(m, vocab, dtype=dtype, device=hidden.device)
            if softcap is not None
            else None
        )
        grad_out = grad_out.to(dtype)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            rows = end - start
            h = hidden[start:end].to(dtype)
            g = grad_out[start:end]  # [rows]
            lab = labels[start:end].unsqueeze(1)
            if kept is not None:  # forward's logits, from the same GEMM call: bitwise a recompute's
                p = kept[start:end].sub_(lse[start:end].unsqueeze(1)).exp_()  # softmax, in place
            elif softcap is None:
                p = _chunk_logits(buf[:rows], h, weight_c.t(), bias_c, scale)
                p.sub_(lse[start:end].unsqueeze(1)).exp_()  # softmax, in place
            else:
                t = _chunk_logits(tbuf[:rows], h, weight_c.t(), bias_c, scale / softcap).tanh_()
                p = torch.mul(t, softcap, out=buf[:rows])
                p.sub_(lse[start:end].unsqueeze(1)).exp_()  # softmax of the capped logits
            # dL/du = s * g * (onehot - p) [* (1 - t^2)], built in place in p.
            g_eff = g * scale
            p.mul_(-g_eff.unsqueeze(1))
            p.scatter_add_(1, lab, g_eff.unsqueeze(1))
            if softcap is not None:
                p.mul_(t.square_().neg_().add_(1.0))  # tanh' = 1 - t^2
            if need_h:
                torch.mm(p, weight_c, out=grad_h[start:end])
            if need_w:
                grad_w.addmm_(p.t(), h)
            if need_b:
                grad_b.add_(p.sum(0))
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def selected_token_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_bytes: int = 0,
) -> Tensor:
    """Per-token log-probs ``log softmax(z)[label]`` of already-selected positions, chunked over tokens.

    Args:
        hidden: ``[N, H]`` last hidden states of the positions to score (bf16/fp16/fp32/fp64).
        lm_head_weight: ``[V, H]`` LM-head weight.
        labels: ``[N]`` token ids in ``[0, V)`` predicted at those positions (already shifted and selected).
        lm_head_bias: optional ``[V]`` LM-head bias.
        logit_scale: multiplies the logits (e.g. Cohere); 1.0 for most models.
        logit_softcap: ``c`` in ``c * tanh(z / c)`` (e.g. Gemma 2), applied after the scale; None for none.
        chunk_size: tokens per chunk; peak extra memory is ``chunk_size x V`` fp32 (twice with a soft-cap).
        keep_bytes: when a gradient is needed, there is no soft-cap and ``N x V`` in the compute dtype
            fits this many bytes, forward keeps every token's logits for backward instead of backward
            recomputing them (0: always recompute). The first backward consumes them; a second one over
            the same graph (``retain_graph``) recomputes.

    Returns:
        ``[N]`` per-token log-probs in fp32 (float64 for float64 inputs). Differentiable w.r.t. ``hidden``,
        ``lm_head_weight`` and ``lm_head_bias``; backward recomputes each chunk's logits unless kept.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must be [N] = [{hidden.shape[0]}] to match hidden {tuple(hidden.shape)}, "
            f"got shape {tuple(labels.shape)}"
        )
    _validate_head_args(
        hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcap, chunk_size
    )
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int) or keep_bytes < 0:
        raise ValueError(f"keep_bytes must be an int >= 0, got {keep_bytes!r}")
    logit_softcap = None if logit_softcap is None else float(logit_softcap)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    )
    keep = grads and keeps_logits(
        hidden.shape[0], lm_head_weight.shape[0], keep_bytes=keep_bytes,
        softcap=logit_softcap is not None,
        itemsize=_compute_dtype(hidden, lm_head_weight, lm_head_bias).itemsize,
    )  # fmt: skip
    return _SelectedTokenLogps.apply(
        hidden,
        lm_head_weight,
        lm_head_bias,
        labels.long(),
        float(logit_scale),
        logit_softcap,
        chunk_size,
        keep,
    )


@torch.no_grad()
def token_log_collision(
    hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """``log Σ_v softmax(z)_v² = logsumexp(2z) − 2·logsumexp(z)`` per position, ``[N]``, no gradient.

    The log collision probability of the next-token distribution (WPO's sampled weight alignment divides
    each token's probability by it). Same chunking and logit transform as :func:`selected_token_logps`.
    """
    _validate_head_args(
        hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcap, chunk_size
    )
    dtype = _compute_dtype(hidden, lm_head_weight, lm_head_bias)
    n, vocab = hidden.shape[0], lm_head_weight.shape[0]
    weight_t = lm_head_weight.to(dtype).t()
    bias = None if lm_head_bias is None else lm_head_bias.to(dtype)
    out = torch.empty(n, dtype=dtype, device=hidden.device)
    buf = torch.empty(min(chunk_size, n), vocab, dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].to(dtype)
        if logit_softcap is None:
            z = _chunk_logits(buf[: end - start], h, weight_t, bias, logit_scale)
        else:
            z = _chunk_logits(buf[: end - start], h, weight_t, bias, logit_scale / logit_softcap)
            z.tanh_().mul_(logit_softcap)
        out[start:end] = torch.logsumexp(2 * z, dim=1) - 2 * torch.logsumexp(z, dim=1)
    return out


def chunked_sequence_logps(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_bytes: int = 0,
) -> tuple[Tensor, Tensor]:
    """Same result as ``sequence_logps(lm_head(hidden_states), ...)`` without any ``[B, T, V]`` tensor.

    Only response positions are projected through the LM head: the hidden state at ``t`` (for
    ``completion_mask[:, 1:][t] == 1``) with label ``input_ids[:, t + 1]``. Per-token log-probs come from
    :func:`selected_token_logps` (chunked, recomputed in backward) and are summed per row.

    Args:
        hidden_states: ``[B, T, H]`` last hidden states (after the final norm).
        lm_head_weight, lm_head_bias, logit_scale, logit_softcap, chunk_size, keep_bytes: see
            :func:`selected_token_logps`.
        input_ids: ``[B, T]``; any value is allowed where the mask is 0.
        completion_mask: ``[B, T]``, nonzero at response tokens.

    Returns:
        ``(logps [B] fp32, n_tokens [B] int64)``.

    Note: selecting the response positions is a boolean-mask index, i.e. one host-device sync on GPU.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, H], got shape {tuple(hidden_states.shape)}")
    if (
        input_ids.shape != hidden_states.shape[:2]
        or completion_mask.shape != hidden_states.shape[:2]
    ):
        raise ValueError(
            "input_ids and completion_mask must be [B, T] matching hidden_states [B, T, H]: got "
            f"hidden_states {tuple(hidden_states.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"completion_mask {tuple(completion_mask.shape)}"
        )
    batch = hidden_states.shape[0]
    mask = completion_mask[:, 1:].bool()  # [B, T-1], shifted with the labels
    rows, cols = mask.nonzero(as_tuple=True)  # response predictions only
    hidden = hidden_states[rows, cols]  # [N, H]: position t predicts token t+1
    labels = input_ids[rows, cols + 1]  # [N]
    token_logps = selected_token_logps(
        hidden,
        lm_head_weight,
        labels,
        lm_head_bias=lm_head_bias,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        chunk_size=chunk_size,
        keep_bytes=keep_bytes,
    )
    return segment_sum(token_logps, rows, batch), mask.sum(-1, dtype=torch.int64)
