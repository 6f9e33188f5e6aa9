"""preftune.model.forward: the extras the loss options need (LD-DPO's prefix sums, WPO's collision sums)
equal a float64 brute force from the model's full logits, in every layout, without full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.model import PaddedLayout, SharedPromptLayout

VOCAB = 50


def _llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _pairs() -> list[dict]:
    """Chosen longer, rejected longer, equal lengths, a one-token response."""
    g = torch.Generator().manual_seed(2)
    shapes = [(5, 7, 3), (2, 2, 6), (4, 3, 3), (3, 1, 4)]
    rows = []
    for i, (p, c, r) in enumerate(shapes):
        ids = torch.randint(1, VOCAB, (p + c + r,), generator=g).tolist()
        rows.append(
            {
                "prompt_ids": ids[:p],
                "chosen_ids": ids[p : p + c],
                "rejected_ids": ids[p + c :],
                "index": i,
            }
        )
    return rows


def _brute_force(model, pairs):
    """Per response (chosen rows, then rejected): total, prefix over ℓ_s = min(n_w, n_l) tokens, and
    Σ_t log Σ_v p_t(v)², all in float64 from full logits of the unpadded sequence."""
    model64 = copy.deepcopy(model).double()
    totals, prefixes, collisions = [], [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in pairs:
            public = min(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            logp = torch.log_softmax(model64(input_ids=ids).logits[0], -1)  # [L, V]
            p = len(ex["prompt_ids"])
            steps = range(max(p, 1), ids.shape[1])  # position t is predicted by t - 1
            token = [logp[t - 1, ids[0, t]] for t in steps]
            totals.append(sum(token))
            prefixes.append(sum(token[:public]))
            collisions.append(sum(torch.logsumexp(2 * logp[t - 1], -1) for t in steps))
    return torch.stack(totals), torch.stack(prefixes), torch.stack(collisions)


@pytest.mark.parametrize("layout_name", ["padded", "padded_full_logits", "shared_prompt"])
def test_prefix_and_collision_sums_equal_a_float64_brute_force(layout_name):
    model = _llama()
    pairs = _pairs()
    total, prefix, collision = _brute_force(model, pairs)
    extras = ("prefix", "collision")
    if layout_name == "shared_prompt":
        layout = SharedPromptLayout(pad_token_id=0, chunk_size=5, attention_layers=2, extras=extras)
    else:
        layout = PaddedLayout(
            pad_token_id=0, chunk_size=5, chunked_head=layout_name == "padded", extras=extras
        )
    out = layout.logps(layout.module(model), layout.collate(pairs))
    got_total = torch.cat([out.chosen_logps, out.rejected_logps]).double()
    got_prefix = torch.cat([out.chosen_prefix_logps, out.rejected_prefix_logps]).double()
    got_collision = torch.cat([out.chosen_log_collision, out.rejected_log_collision]).double()
    torch.testing.assert_close(got_total.detach(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_prefix.detach(), prefix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_collision, collision, rtol=1e-5, atol=1e-5)
    assert not got_collision.requires_grad  # WPO's weights are detached
    # The shorter response of each pair is its own prefix; the longer one's is not.
    n_c, n_r = out.chosen_tokens, out.rejected_tokens
    shorter = torch.where(n_c <= n_r, out.chosen_logps, out.rejected_logps)
    shorter_prefix = torch.where(n_c <= n_r, out.chosen_prefix_logps, out.rejected_prefix_logps)
    torch.testing.assert_close(shorter_prefix, shorter)


def test_prefix_gradients_flow_only_through_the_prefix_tokens():
    """d prefix / d θ equals the gradient of the brute-force prefix sum (the tail tokens get none)."""
    model = _llama()
    pairs = _pairs()
    layout = PaddedLayout(pad_token_id=0, chunk_size=5, extras=("prefix",))
    out = layout.logps(layout.module(model), layout.collate(pairs))
    torch.cat([out.chosen_prefix_logps, out.rejected_prefix_logps]).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = copy.deepcopy(model)
    prefixes = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in pairs:
            public = min(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            logp = torch.log_softmax(ref(input_ids=ids).logits[0], -1)
            p = len(ex["prompt_ids"])
            prefixes += [logp[t - 1, ids[0, t]] for t in range(p, p + public)]
    torch.stack(prefixes).sum().backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
