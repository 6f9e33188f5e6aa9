"""Before/after numbers for the demo on held-out prompts: task reward, sampled KL, implicit-reward accuracy.

- Task reward: share of exactly right answers (and mean digit-level partial credit), greedy and sampled.
- Sampled KL(π‖π_ref): mean over answers y ~ π(·|x) of Σ_t [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)]
  over the response tokens (EOS included), the Monte-Carlo estimate used for the DPO paper's
  reward-vs-KL frontier. Samples are drawn at temperature 1, or the estimate would not be of π.
- Implicit-reward accuracy (DPO §5): share of pairs where β·(log π − log π_ref) is larger for chosen than
  for rejected; β > 0 does not change which is larger, so none is needed.

The response log-probs go through :func:`preftune.logprobs.sequence_logps`, the trainer's own reference
implementation (logits at t predict token t+1; only response tokens count), so the shift lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preftune.demo import task
from preftune.demo.sampling import decode_answers, generate_ids
from preftune.logprobs import sequence_logps

__all__ = [
    "before_after_samples",
    "evaluate_model",
    "implicit_reward_accuracy",
    "response_logps",
    "sampled_kl",
    "task_reward",
]


def _max_new_tokens(prompts: Sequence[str]) -> int:
    return max(len(task.target(p)) for p in prompts) + 1  # room for the longest right answer + EOS


def task_reward(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, float]:
    """``{"accuracy", "partial", "n"}`` over all answers (greedy: one per prompt; sampled: ``num_samples``)."""
    answers = decode_answers(
        tokenizer,
        generate_ids(
            model,
            tokenizer,
            prompts,
            num_samples=num_samples,
            do_sample=do_sample,
            temperature=temperature,
            max_new_tokens=_max_new_tokens(prompts),
            batch_size=batch_size,
            seed=seed,
        ),
    )
    flat = [(p, a) for p, per_prompt in zip(prompts, answers) for a in per_prompt]
    exact = sum(task.is_correct(p, a) for p, a in flat) / len(flat)
    partial = sum(task.digit_score(p, a) for p, a in flat) / len(flat)
    return {"accuracy": exact, "partial": partial, "n": len(flat)}


@torch.no_grad()
def response_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Σ log π(response | prompt) per row ([N] fp32); ``responses`` are token ids (EOS included if any)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        prompt_ids = tokenizer(list(chunk_p))["input_ids"]
        rows = [p + list(r) for p, r in zip(prompt_ids, responses[start : start + batch_size])]
        width = max(map(len, rows))
        lengths = torch.tensor([len(r) for r in rows])
        starts = torch.tensor([len(p) for p in prompt_ids])
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        pos = torch.arange(width)
        attention_mask = (pos < lengths[:, None]).long()
        completion_mask = (pos >= starts[:, None]) & (pos < lengths[:, None])  # [B, T]
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        out.append(sequence_logps(logits, input_ids, completion_mask)[0])  # the shift lives there
    return torch.cat(out)


def sampled_kl(
    policy,
    ref,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 4,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, float]:
    """Monte-Carlo KL(π‖π_ref) per answer: ``{"kl", "stderr", "n"}`` from ``num_samples`` samples/prompt."""
    ids = generate_ids(
        policy,
        tokenizer,
        prompts,
        num_samples=num_samples,
        do_sample=True,
        temperature=1.0,
        max_new_tokens=_max_new_tokens(prompts),
        batch_size=batch_size,
        seed=seed,
    )
    flat_prompts = [p for p, per_prompt in zip(prompts, ids) for _ in per_prompt]
    flat_ids = [r for per_prompt in ids for r in per_prompt]
    diff = response_logps(policy, tokenizer, flat_prompts, flat_ids) - response_logps(
        ref, tokenizer, flat_prompts, flat_ids
    )
    n = diff.numel()
    return {"kl": diff.mean().item(), "stderr": (diff.std() / n**0.5).item(), "n": n}


def implicit_reward_accuracy(policy, ref, tokenizer, pairs: Sequence[dict]) -> dict[str, float]:
    """Share of pairs whose implicit reward is higher for chosen, and the mean log-ratio margin.

    Responses are tokenized as ``answer + EOS`` after ``BOS prompt``, as the preference data loader does.
    """
    prompts = [p["prompt"] for p in pairs]

    def ids(key: str) -> list[list[int]]:
        enc = tokenizer([p[key] for p in pairs], add_special_tokens=False)["input_ids"]
        return [[*e, tokenizer.eos_token_id] for e in enc]

    chosen, rejected = ids("chosen"), ids("rejected")
    ratio_c = response_logps(policy, tokenizer, prompts, chosen) - response_logps(
        ref, tokenizer, prompts, chosen
    )
    ratio_r = response_logps(policy, tokenizer, prompts, rejected) - response_logps(
        ref, tokenizer, prompts, rejected
    )
    margin = ratio_c - ratio_r
    return {
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "n": len(pairs),
    }


def before_after_samples(base, tuned, tokenizer, prompts: Sequence[str], n: int = 5) -> list[dict]:
    """Greedy answers of both models on the first ``n`` prompts where they differ (else the first ``n``)."""
    base_ans = [
        a[0]
        for a in decode_answers(
            tokenizer,
            generate_ids(base, tokenizer, prompts, max_new_tokens=_max_new_tokens(prompts)),
        )
    ]
    tuned_ans = [
        a[0]
        for a in decode_answers(
            tokenizer,
            generate_ids(tuned, tokenizer, prompts, max_new_tokens=_max_new_tokens(prompts)),
        )
    ]
    rows = [
        {
            "prompt": p,
            "target": task.target(p),
            "base": b,
            "tuned": t,
            "base_correct": task.is_correct(p, b),
            "tuned_correct": task.is_correct(p, t),
        }
        for p, b, t in zip(prompts, base_ans, tuned_ans)
    ]
    differ = [r for r in rows if r["base"] != r["tuned"]]
    return (differ + [r for r in rows if r["base"] == r["tuned"]])[:n]


def evaluate_model(
    policy, ref, tokenizer, prompts: Sequence[str], *, num_samples: int = 4, seed: int = 0
) -> dict[str, float]:
    """One row of the before/after table for ``policy`` (pass the base model as both for "before")."""
    greedy = task_reward(policy, tokenizer, prompts)
    sampled = task_reward(
        policy, tokenizer, prompts, do_sample=True, num_samples=num_samples, seed=seed
    )
    kl = sampled_kl(policy, ref, tokenizer, prompts, num_samples=num_samples, seed=seed + 1)
    return {
        "greedy_accuracy": greedy["accuracy"],
        "greedy_partial": greedy["partial"],
        "sampled_accuracy": sampled["accuracy"],
        "sampled_partial": sampled["partial"],
        "kl": kl["kl"],
        "kl_stderr": kl["stderr"],
        "prompts": len(prompts),
    }
