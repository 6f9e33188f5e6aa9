"""Build the demo's base model: a random-init tiny Llama, supervised on the addition task, stopped early.

The demo needs a base model that is *imperfect* at the task: DPO pairs exist only where the model's own
samples contain both right and wrong answers. So pre-training stops at the first evaluation whose
greedy accuracy (on train-bucket prompts; the held-out bucket is never touched) reaches
``target_accuracy``. Everything is seeded, so the same command rebuilds the same folder on the same
software stack:

    python -m preftune.demo.build_base --out src/preftune/demo/base_model --seed 0

The folder is a normal Hugging Face model folder (config, safetensors, tokenizer, generation config)
plus ``preftune_demo.json`` with the task settings, the build settings and the measured accuracies.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from preftune.demo import task
from preftune.demo.evaluate import task_reward
from preftune.demo.sampling import generate_answers
from preftune.demo.tokenizer import build_tokenizer

__all__ = ["BaseSpec", "accuracy", "build_base", "main", "make_model"]

METADATA_FILE = "preftune_demo.json"


@dataclass
class BaseSpec:
    """Settings of the base-model build (all recorded in ``preftune_demo.json``)."""

    seed: int = 0
    digits: int = task.DEFAULT_DIGITS  # operand digits of the task
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    lr: float = 1e-3  # AdamW, linear warm-up then constant: stopping early needs no schedule end
    warmup_steps: int = 50
    batch_size: int = 128  # problems per step
    max_steps: int = 3000
    eval_every: int = 25  # accuracy rises steeply (~0.1 -> 0.8 in 100 steps), so look often
    eval_prompts: int = 256  # train-bucket prompts (a fixed draw) used for the stopping rule
    target_accuracy: float = 0.35  # stop at the first evaluation with greedy accuracy >= this


def make_model(spec: BaseSpec, tokenizer) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama sized by ``spec`` (fp32, tied embeddings)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ``BOS prompt answer EOS`` rows; labels only on ``answer EOS`` (the prompt is noise)."""
    rows, labels = [], []
    for p in prompts:
        prompt_ids = tokenizer(p)["input_ids"]
        answer_ids = tokenizer(task.target(p), add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        rows.append(ids)
        labels.append([-100] * len(prompt_ids) + ids[len(prompt_ids) :])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": (
            torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
        ).long(),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def accuracy(model, tokenizer, prompts: list[str], *, digits: int = task.DEFAULT_DIGITS) -> float:
    """Share of prompts whose greedy answer is exactly right."""
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=task.max_answer_chars(digits) + 1
    )
    return sum(task.is_correct(p, a[0]) for p, a in zip(prompts, answers)) / len(prompts)


def build_base(out_dir: str | Path, spec: BaseSpec, *, log=print) -> dict:
    """Train, stop in the target band, save the folder; returns the metadata written beside it."""
    t0 = time.perf_counter()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer()
    model = make_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Llama: {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
    # one seeded stream of train-bucket problems; the stopping rule looks at a separate fixed draw
    stream = task.sample_prompts(
        spec.batch_size * spec.max_steps,
        split="train",
        seed=spec.seed,
        digits=spec.digits,
        unique=False,
    )
    val = task.sample_prompts(
        spec.eval_prompts, split="train", seed=spec.seed + 10_000, digits=spec.digits
    )
    history: list[dict] = []
    step, acc = 0, 0.0
    for step in range(1, spec.max_steps + 1):
        model.train()
        batch = _batch(tokenizer, stream[(step - 1) * spec.batch_size : step * spec.batch_size])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % spec.eval_every == 0:
            model.eval()
            acc = accuracy(model, tokenizer, val, digits=spec.digits)
            history.append({"step": step, "loss": round(loss.item(), 4), "val_accuracy": acc})
            log(f"step {step:5d}  loss {loss.item():.4f}  greedy val accuracy {acc:.3f}")
            if acc >= spec.target_accuracy:
                break
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=task.max_answer_chars(spec.digits) + 1,
        do_sample=False,
    )
    held = task.heldout_prompts(digits=spec.digits)
    greedy = task_reward(model, tokenizer, held)
    sampled = task_reward(model, tokenizer, held, do_sample=True, num_samples=4, seed=spec.seed)
    log(
        f"held-out accuracy: greedy {greedy['accuracy']:.3f}, sampled (T=1) {sampled['accuracy']:.3f}"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    meta = {
        "task": {
            "name": "addition",
            "digits": spec.digits,
            "prompt_format": "a+b=",
            "answer": "a+b",
        },
        "rebuild": f"python -m preftune.demo.build_base --out {out_dir} --seed {spec.seed}",
        "build": asdict(spec),
        "parameters": n_params,
        "steps": step,
        "val_greedy_accuracy": acc,
        "heldout": {
            "prompts": len(held),
            "seed": task.HELDOUT_SEED,
            "greedy_accuracy": greedy["accuracy"],
            "sampled_accuracy": sampled["accuracy"],
            "sampled_temperature": 1.0,
        },
        "history": history,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    """``python -m preftune.demo.build_base --out DIR --seed S [--field value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="model folder to write")
    for name, value in asdict(BaseSpec()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    meta = build_base(out, BaseSpec(**args))
    print(json.dumps({k: meta[k] for k in ("parameters", "steps", "heldout", "build_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
