"""The CUDA subset (``pytest -m gpu``): what the CPU suite proves, checked again where bf16 autocast, CUDA
kernels (cuBLAS, SDPA flash / memory-efficient attention) and CUDA memory are in the path.

Skipped without a CUDA device; ``bench/gpu_check.sh`` runs it on the lent GPU machine. To check the tests
themselves without a GPU: ``PREFTUNE_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` (CPU autocast to
bf16; slow, and it proves nothing about CUDA).

Precision facts the tolerances below are derived from:

- bf16 keeps 8 significant bits: unit roundoff ``U_BF16 = 2**-8`` (3.9e-3) per rounding.
- fp32 keeps 24: ``2**-24`` (6e-8) per rounding. A dot product of length H in fp32 errs by at most about
  ``H · 2**-24 · Σ|h_k w_k|`` (and typically ``√H`` times less); TF32 (10 bits), if someone turned it on,
  would err ~8000× more than fp32 per product.
- ``logp_t = z_y − logsumexp(z)``: if every logit moves by at most ``m`` (``|δz_v| ≤ m``), ``z_y`` moves by at
  most ``m`` and ``logsumexp`` (monotone and shift-equivariant) by at most ``m``, so ``|δ logp_t| ≤ 2m``
  exactly, with no higher-order term.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest
import torch
from _tiny import make_tiny_llama, tiny_train_config, toy_pairs, write_jsonl

DEVICE = torch.device(os.environ.get("PREFTUNE_GPU_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

U_BF16 = 2.0**-8


def autocast_bf16():
    return torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16)


def no_autocast():
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama-gpu")
    make_tiny_llama(d, seed=0)
    return d


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", toy_pairs(32, seed=0))


@pytest.fixture(scope="module")
def pairs(tiny_dir, tmp_path_factory) -> list[dict]:
    """Six tokenized pairs of unequal lengths (prompts 4–9 tokens, responses 3–12)."""
    from preftune.build import build_tokenizer
    from preftune.config import Config, DataConfig
    from preftune.data import load_preference_data

    path = write_jsonl(tmp_path_factory.mktemp("pairs6") / "d.jsonl", toy_pairs(6, seed=3))
    cfg = Config()
    cfg.model.path = str(tiny_dir)
    data = load_preference_data(DataConfig(train_files=[str(path)]), build_tokenizer(cfg))
    return [data.train[i] for i in range(6)]


def _load(model_dir: Path):
    from preftune.model import load_model, resolve_source

    return load_model(resolve_source(model_dir), device=DEVICE)


def _layouts(chunk_size: int = 4):
    from preftune.model import PaddedLayout, SharedPromptLayout

    return {
        "padded": PaddedLayout(pad_token_id=0, chunk_size=chunk_size),
        "shared": SharedPromptLayout(pad_token_id=0, chunk_size=chunk_size, attention_layers=2),
    }


def _logps(layout, module, batch) -> torch.Tensor:
    out = layout.logps(module, batch.to(DEVICE))
    return torch.cat([out.chosen_logps, out.rejected_logps])


# ----------------------------------------------------------------------------- chunked LM head
@pytest.mark.parametrize(
    ("use_bias", "scale", "softcap"), [(False, 1.0, None), (True, 1.0, None), (True, 2.5, 4.0)]
)
def test_chunked_head_keeps_fp32_maths_under_bf16_autocast(use_bias, scale, softcap):
    """The chunked LM head under ``torch.autocast(bf16)`` computes in fp32: values and gradients equal the
    float64 brute force to fp32 accuracy.

    Autocast would run a plain ``mm``/``addmm`` in bf16; the head's GEMMs write into preallocated fp32
    buffers (``out=`` / in-place variants, which autocast leaves alone), so nothing is rounded to 8 bits.
    Tolerances: H = 256, logits of standard deviation ~3, so one fp32 logit errs by ~1e-6 typically and by
    ≤ 5e-4 at the very worst (H · 2**-24 · Σ|h_k w_k| with Σ|h_k w_k| ≈ 30); log-sum-exp adds a few ulps.
    Per token we allow 5e-5 (measured ≤ 3e-6); per 50-token row sum, 5e-4 + 1e-5 relative. Gradients:
    rtol 1e-4, atol 1e-5, as the CPU suite's fp32 tests. The test checks that it can tell: the same inputs
    rounded to bf16 (what a bf16 head would see) must miss the per-token tolerance by 10× or more.
    """
    from preftune.logprobs import chunked_sequence_logps, selected_token_logps

    gen = torch.Generator().manual_seed(11)
    n, hidden, vocab = 300, 256, 1000
    h = torch.randn(n, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * (3.0 / math.sqrt(hidden))
    bias = torch.randn(vocab, generator=gen) if use_bias else None
    labels = torch.randint(vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    params = [h, weight] + ([bias] if use_bias else [])
    leaves = [p.to(DEVICE).requires_grad_(True) for p in params]
    leaves64 = [p.to(DEVICE).double().requires_grad_(True) for p in params]
    labels, upstream = labels.to(DEVICE), upstream.to(DEVICE)

    def brute(h, w, b):
        z = h @ w.T
        if b is not None:
            z = z + b
        z = z * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.log_softmax(z, -1)[torch.arange(n, device=DEVICE), labels]

    kw = dict(logit_scale=scale, logit_softcap=softcap, chunk_size=128)  # 3 chunks
    with autocast_bf16():
        got = selected_token_logps(
            leaves[0], leaves[1], labels, lm_head_bias=leaves[2] if use_bias else None, **kw
        )
    ref = brute(*leaves64, *([] if use_bias else [None]))
    assert got.dtype == torch.float32
    token_tol = 5e-5
    torch.testing.assert_close(got.double(), ref.detach(), rtol=0, atol=token_tol)
    got_grads = torch.autograd.grad((got * upstream).sum(), leaves)
    want_grads = torch.autograd.grad((ref * upstream.double()).sum(), leaves64)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)

    # The same through chunked_sequence_logps on a [B, T, H] batch (6 rows of 50 tokens, responses only).
    hs = leaves[0].detach().reshape(6, 50, hidden)
    ids = torch.randint(vocab, (6, 50), generator=gen).to(DEVICE)
    mask = torch.zeros(6, 50, dtype=torch.long, device=DEVICE)
    for row in range(6):
        mask[row, 5 + 3 * row :] = 1
    with autocast_bf16():
        sums, counts = chunked_sequence_logps(
            hs,
            leaves[1].detach(),
            ids,
            mask,
            lm_head_bias=None if bias is None else leaves[2],
            **kw,
        )
    z64 = hs.double() @ leaves64[1].detach().T
    if use_bias:
        z64 = z64 + leaves64[2].detach()
    z64 = z64 * scale
    if softcap is not None:
        z64 = softcap * torch.tanh(z64 / softcap)
    logp64 = torch.log_softmax(z64[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    want = (logp64 * mask[:, 1:]).sum(-1)
    assert counts.tolist() == mask[:, 1:].sum(-1).tolist()
    torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=5e-4)

    # The tolerance can tell fp32 from bf16: bf16-rounded inputs miss it by far.
    rounded = [p.detach().bfloat16().double() for p in leaves64]
    bf16_err = (brute(*rounded, *([] if use_bias else [None])) - ref.detach()).abs().max()
    assert bf16_err > 10 * token_tol, f"the test cannot see a bf16 head (bf16 error {bf16_err:.2e})"


def test_model_logps_under_bf16_autocast_within_the_bound_of_its_hidden_states(tiny_dir, pairs):
    """A tiny Llama's per-pair log-probs (padded layout, chunked head) under bf16 autocast vs fp32.

    Bound, per row: with ``δh_t`` the difference of the decoder's last hidden states (autocast − fp32, both
    measured here) and ``m_t = max_v |δh_t · w_v|`` the largest logit change it causes at a scored position,
    ``|δ logp_row| ≤ Σ_t 2·m_t`` exactly (module docstring), plus fp32 slack (1e-4 + 1e-5 relative). So
    the head and the summation add nothing beyond what bf16 did to the decoder. Separately the decoder's
    bf16 error itself is bounded: each layer rounds four matmul inputs (attention in and out, MLP in and
    the gated product) to bf16, and errors add across the ``L = 2`` layers, so the relative error of the
    last hidden state stays under ``2 · 4 · L · U_BF16`` (6%; measured ~0.3%). Nothing is NaN.
    """
    from preftune.logprobs import sequence_logps

    model = _load(tiny_dir)
    layout = _layouts()["padded"]
    module = layout.module(model)
    batch = layout.collate(pairs).to(DEVICE)
    decoder = model.model
    with torch.no_grad():
        fp32 = _logps(layout, module, batch)
        h32 = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state.float()
        with autocast_bf16():
            bf16 = _logps(layout, module, batch)
            hbf = decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).last_hidden_state.float()
        full = sequence_logps(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            batch.input_ids,
            batch.completion_mask,
        )[0]
    assert torch.isfinite(bf16).all() and bf16.dtype == torch.float32
    torch.testing.assert_close(
        fp32, full, rtol=1e-5, atol=1e-4
    )  # chunked head = full logits (fp32)
    real = batch.attention_mask.bool()
    rel = ((hbf - h32)[real].norm() / h32[real].norm()).item()
    assert rel < 2 * 4 * 2 * U_BF16, f"decoder bf16 relative error {rel:.2e}"
    weight = model.get_output_embeddings().weight.float()  # [V, H]
    m = ((hbf - h32) @ weight.T).abs().amax(-1)  # [rows, T]: largest logit change per position
    scored = batch.completion_mask[:, 1:].bool()  # position t predicts token t + 1
    bound = (2 * m[:, :-1] * scored).sum(-1) + 1e-4 + 1e-5 * fp32.abs()
    err = (bf16 - fp32).abs()
    assert (err <= bound).all(), f"errors {err.tolist()} vs bounds {bound.tolist()}"


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("kernel", ["flex", "segments"])
def test_shared_prompt_equals_padded_rows_on_cuda_fp32(tiny_dir, pairs, kernel):
    """The shared ``[P|C|R]`` layout gives the padded rows' log-probs and gradients, fp32 on CUDA, with
    the fused FlexAttention kernel (the default on CUDA; its backward exists only there) and with the
    per-segment SDPA calls.

    Different attention kernels (one masked SDPA call over padded rows vs. per-segment calls) and
    different GEMM shapes sum in different orders: fp32 rounding, ~1e-6 relative on a 2-layer model
    (measured). Values: rtol 1e-5, atol 1e-4 on row sums of ~50 nats. Gradients: rtol 1e-4 and, per
    tensor, atol 1e-4 × its largest entry (cancellation leaves some entries near zero). A wrong mask or
    position changes a row sum by the context effect, ~0.6 nats on this model: 6000× the value tolerance.
    """
    layouts = _layouts()
    gen = torch.Generator().manual_seed(5)
    upstream = torch.randn(2 * len(pairs), generator=gen).to(DEVICE)
    values, grads = {}, {}
    for name, layout in layouts.items():
        model = _load(tiny_dir)
        module = layout.module(model)
        if name == "shared":
            module.kernel = kernel
        logps = _logps(layout, module, layout.collate(pairs))
        (logps * upstream).sum().backward()
        values[name] = logps.detach()
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(values["shared"], values["padded"], rtol=1e-5, atol=1e-4)
    for n, want in grads["padded"].items():
        scale = want.abs().max().item()
        torch.testing.assert_close(
            grads["shared"][n], want, rtol=1e-4, atol=1e-4 * scale + 1e-12, msg=n
        )
    assert any(g.abs().sum() > 0 for g in grads["padded"].values())


def test_shared_prompt_matches_padded_rows_under_bf16_autocast(tiny_dir, pairs):
    """Under bf16 autocast (flash / memory-efficient SDPA kernels on CUDA, per segment) the shared layout
    stays as close to the fp32 padded truth as the padded layout itself does under bf16.

    Each layout's bf16 result is one bf16 error ``e`` away from the fp32 value; the bound is
    ``4 · max_row e_padded + 1e-3`` (twice the triangle inequality's 2e). A mask or position error moves a
    row by the context effect instead; the test checks it can tell: reversing every prompt (same lengths,
    other context) moves the fp32 padded sums by more than 10× the bound.
    """
    layouts = _layouts()
    model = _load(tiny_dir)
    results = {}
    with torch.no_grad():
        for name, layout in layouts.items():
            module = layout.module(model)
            batch = layout.collate(pairs)
            with autocast_bf16():
                results[name] = _logps(layout, module, batch)
            if name == "padded":
                truth = _logps(layout, module, batch)
                reversed_pairs = [{**p, "prompt_ids": list(p["prompt_ids"])[::-1]} for p in pairs]
                other_context = _logps(layout, module, layout.collate(reversed_pairs))
    e_padded = (results["padded"] - truth).abs().max().item()
    bound = 4 * e_padded + 1e-3
    err = (results["shared"] - truth).abs().max().item()
    assert err <= bound, f"shared bf16 is {err:.2e} from fp32 (padded bf16: {e_padded:.2e})"
    context = (other_context - truth).abs().max().item()
    assert context > 10 * bound, (
        f"context effect {context:.2e} too small to test against {bound:.2e}"
    )


# ----------------------------------------------------------------------------- training on CUDA
def _first_metrics(run_dir: Path) -> dict:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["split"] == "train")


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_first_step_loss_is_ln2_on_cuda(tiny_dir, pairs_file, tmp_path, dtype):
    """At θ₀ the frozen reference copy runs the same weights through the same kernels on the same batch,
    so every margin is 0 and the first loss is −log σ(0) = ln 2, with bf16 autocast (``auto`` on CUDA) as
    in fp32. CUDA forwards are deterministic for a fixed shape, so the tolerance is fp32 rounding of ln 2
    itself (1e-6). The run must really have used the device (its peak memory grows)."""
    from preftune.trainer import train

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    cfg = tiny_train_config(
        tiny_dir,
        pairs_file,
        tmp_path / "run",
        train__device=str(DEVICE),
        model__dtype=dtype,
        train__max_steps=1,
    )
    train(cfg)
    first = _first_metrics(tmp_path / "run")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated() > before


@pytest.mark.parametrize("layout_name", ["padded", "shared"])
def test_accumulation_equals_one_big_batch_on_cuda_fp32(tiny_dir, pairs, layout_name):
    """Micro-batches of 3 + 1 + 2 pairs give the gradient of one 6-pair batch, on CUDA in fp32, with a pair
    loss and a token-level loss (sigmoid + 0.5·sft, whose token weighting would expose a per-micro-batch
    mean). Different batch shapes change only the summation order: rtol 1e-4 and, per tensor,
    atol 1e-5 × its largest entry. A wrong normalisation is off by a factor (1/3 to 3)."""
    import preftune.build as build
    from preftune.config import Config
    from preftune.distributed import DistContext
    from preftune.reference import CopyReference
    from preftune.trainer import window_backward

    cfg = Config()
    cfg.loss.name = ["sigmoid", "sft"]
    cfg.loss.weights = [1.0, 0.5]
    make_objective = getattr(build, "build_objective", None) or build.build_loss_fn

    def grads(windows):
        layout = _layouts()[layout_name]
        model = _load(tiny_dir)
        policy = layout.module(model)
        reference = CopyReference(model, layout)
        torch.manual_seed(0)
        with torch.no_grad():  # off θ₀: margins not all zero
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        micro = [layout.collate([pairs[i] for i in idx]) for idx in windows]
        window_backward(
            policy,
            reference,
            micro,
            make_objective(cfg),
            layout=layout,
            device=DEVICE,
            autocast=no_autocast,
            dist=DistContext(device=DEVICE),
        )
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    big = grads([[0, 1, 2, 3, 4, 5]])
    small = grads([[0, 1, 2], [3], [4, 5]])
    for n, want in big.items():
        assert want.device.type == DEVICE.type
        scale = want.abs().max().item()
        torch.testing.assert_close(small[n], want, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=n)
    assert any(g.abs().sum() > 0 for g in big.values())


def test_save_and_reload_on_cuda(tiny_dir, pairs_file, tmp_path):
    """Train on CUDA (bf16 autocast), save, reload.

    - the final folder holds fp32 master weights (autocast never casts them), finite, moved from θ₀;
    - reloaded on CUDA, the chunked layout gives the model's full-logits log-probs (fp32: rtol 1e-5), and
      the same as reloaded on the CPU (fp32 on two devices: rtol 1e-5, atol 1e-4);
    - resuming the step-1 checkpoint of the run in a new folder ends at the uninterrupted run's weights.
      Not bitwise: CUDA's embedding backward adds with atomics, in any order, so gradients differ in the
      last fp32 bits; after Adam's normalised steps of lr 3e-3 that is far below atol 1e-6.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from preftune.logprobs import sequence_logps
    from preftune.trainer import train

    def cfg(out, **over):
        return tiny_train_config(
            tiny_dir,
            pairs_file,
            out,
            train__device=str(DEVICE),
            train__max_steps=2,
            train__save_every=1,
            **over,
        )

    a = train(cfg(tmp_path / "a"))
    weights = load_file(a.final_model_dir / "model.safetensors")
    start = load_file(tiny_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert any(not torch.equal(weights[k], start[k]) for k in start), "training moved no weight"

    layout = _layouts(chunk_size=1024)["padded"]
    example = {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "weight": 1.0}
    batch = layout.collate([example])
    sums = {}
    for dev in (DEVICE, torch.device("cpu")):
        model = AutoModelForCausalLM.from_pretrained(a.final_model_dir).to(dev)
        with torch.no_grad():
            out = layout.logps(layout.module(model), batch.to(dev))
            ours = torch.cat([out.chosen_logps, out.rejected_logps])
            full = sequence_logps(
                model(
                    input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev)
                ).logits,
                batch.input_ids.to(dev),
                batch.completion_mask.to(dev),
            )[0]
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
        sums[dev.type] = ours.cpu()
    torch.testing.assert_close(sums[DEVICE.type], sums["cpu"], rtol=1e-5, atol=1e-4)

    step1 = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))[0]
    b = train(cfg(tmp_path / "b", train__resume=str(step1)))
    resumed = load_file(b.final_model_dir / "model.safetensors")
    for k, want in weights.items():
        torch.testing.assert_close(resumed[k], want, rtol=0, atol=1e-6, msg=k)
