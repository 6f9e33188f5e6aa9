"""compare.py's workers (child side, one process per run): each system trains on the spec's model and data
and records raw timings, the pairs of each step, the first losses and log-probs and peak RSS; the parent
turns them into numbers (:mod:`compare_report`). preftune is watched through its public callback
(:class:`preftune.callbacks.Callback`); TRL through its own ``TrainerCallback`` and ``compute_loss``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from _common import read_jsonl
from compare_plan import BETA

__all__ = ["Recorder", "worker_fp64", "worker_preftune", "worker_prepare", "worker_trl"]


class Recorder:
    """Step-end timestamps, the pairs of each step, losses and peak RSS, recorded inside a child."""

    def __init__(self, spec: dict):
        self.total = spec["warmup"] + spec["steps"]
        self.step_end_times: list[float] = []
        self.step_pairs: list[list[int]] = []
        self.losses: list[Any] = []
        self.logps_chosen: list[Any] = []
        self.logps_rejected: list[Any] = []
        self.peak_rss_train_kib: int | None = None
        self.tokens_match = True
        rows = read_jsonl(Path(spec["data_file"]))
        # Token ids straight from the data: BOS=1, "w<id>" -> id, EOS=2 (the word-level tokenizer).
        self.expected = []
        self.by_chosen_row: dict[tuple[int, ...], int] = {}
        for i, r in enumerate(rows):
            p = [1] + [int(w[1:]) for w in r["prompt"].split()]
            c = [int(w[1:]) for w in r["chosen"].split()] + [2]
            j = [int(w[1:]) for w in r["rejected"].split()] + [2]
            self.expected.append((p, c, j))
            self.by_chosen_row[tuple(p + c)] = i

    def step_end(self) -> None:
        self.step_end_times.append(time.perf_counter())
        if len(self.step_end_times) == self.total:
            from _common import peak_rss_kib

            self.peak_rss_train_kib = peak_rss_kib()

    def window(self, info) -> None:
        """preftune: the pairs of one optimizer step from the trainer's ``StepInfo`` (rows of the training
        split: the data file's, nothing being dropped); their trained token counts must be the data's."""
        pairs = []
        for indices, counts in zip(info.indices, info.tokens):
            for i, trained in zip(indices, counts):
                if not 0 <= i < len(self.expected):
                    self.tokens_match = False
                    continue
                if trained != tuple(len(part) for part in self.expected[i]):
                    self.tokens_match = False
                pairs.append(i)
        self.step_pairs.append(pairs)

    def check_token_ids(self, rows) -> None:
        """preftune: every trained pair's token ids (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of the
        tokenized training split, row ``i`` for data line ``i``) equal the ids written in the data."""
        for i in sorted({i for step in self.step_pairs for i in step}):
            row = rows[i]
            if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != self.expected[i]:
                self.tokens_match = False

    def batch(self, input_ids, attention_mask, completion_mask, index=None) -> None:
        """TRL: identify the pairs of a padded [2B, T] batch from its chosen rows; check every token."""
        rows = input_ids.shape[0]
        b = rows // 2
        pairs = []
        for k in range(b):
            n = int(attention_mask[k].sum())
            key = tuple(input_ids[k, :n].tolist())
            i = self.by_chosen_row.get(key)
            if i is None and index is not None:
                i = int(index[k])
                self.tokens_match = False
            if i is None:
                self.tokens_match = False
                continue
            p, c, r = self.expected[i]
            n_r = int(attention_mask[b + k].sum())
            if input_ids[b + k, :n_r].tolist() != p + r:
                self.tokens_match = False
            if int(completion_mask[k].sum()) != len(c) or int(completion_mask[b + k].sum()) != len(
                r
            ):
                self.tokens_match = False
            pairs.append(i)
        self.step_pairs.append(pairs)

    def dump(self, path: Path, **extra) -> None:
        def num(x):
            return float(x) if x is not None else None

        out = {
            "step_end_times": self.step_end_times,
            "step_pairs": self.step_pairs,
            "losses": [num(x) for x in self.losses],
            "logps_chosen_mean": [num(x) for x in self.logps_chosen],
            "logps_rejected_mean": [num(x) for x in self.logps_rejected],
            "peak_rss_train_kib": self.peak_rss_train_kib,
            "tokens_match_data": self.tokens_match,
            **extra,
        }
        Path(path).write_text(json.dumps(out, indent=1))


def worker_prepare(spec: dict) -> None:
    from _common import build_model_folder

    build_model_folder(Path(spec["out_dir"]), spec["model"], seed=spec["seed"])


def worker_preftune(spec: dict, out: Path) -> None:
    from _common import matmul_gflops, peak_rss_kib

    probe_before = matmul_gflops()
    t0 = time.perf_counter()
    import torch

    from preftune.build import build_tokenizer
    from preftune.callbacks import Callback
    from preftune.config import (
        apply_overrides,
        config_from_dict,
        resolved_reference_strategy,
        validate,
    )
    from preftune.data import load_preference_data
    from preftune.trainer import train

    rec = Recorder(spec)
    work = Path(spec["work"])
    mode = spec["mode"]
    cfg = config_from_dict(
        {
            "model": {
                "path": spec["model_dir"],
                "gradient_checkpointing": mode == "gc",
            },
            "data": {
                "train_files": [spec["data_file"]],
                "max_length": spec["max_length"],
                "max_prompt_length": None,  # TRL 1.16 has no prompt limit; every row fits max_length
                "cache_dir": str(work / "cache"),
            },
            "loss": {"name": ["sigmoid"], "beta": BETA},
            "reference": {
                "strategy": "precomputed" if mode == "precomputed" else "auto",
                "path": spec["ref_model_dir"],
                "batch_size": spec["batch"],  # as TRL: precompute_ref_batch_size = per-device batch
                "cache_dir": str(work / "cache"),
            },
            "optim": {
                "lr": spec["lr"],
                "scheduler": "linear",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
            },
            "train": {
                "output_dir": str(work / "run"),
                "seed": spec["seed"],
                "max_steps": spec["warmup"] + spec["steps"],
                "batch_size": spec["batch"],
                "grad_accum": 1,
                "device": "cpu",
                "resume": "never",
                "save_final": False,
            },
            "log": {"log_every": 1, "progress": False, "report_to": []},
        }
    )
    if mode == "padded":
        cfg.train.prefix_sharing = False
    apply_overrides(cfg, spec.get("preftune_set") or [])
    validate(cfg)

    class Watch(Callback):
        """Step end = the trainer's callback, right after the step's optimizer and scheduler step and its
        metrics row (log_every=1: every step's loss and mean log-probs, for the exactness rows)."""

        def on_step_end(self, step, metrics, batch) -> None:
            rec.step_end()
            rec.window(batch)
            if metrics is not None and len(rec.losses) < 4:
                rec.losses.append(metrics["loss"])
                rec.logps_chosen.append(metrics["logps/chosen"])
                rec.logps_rejected.append(metrics["logps/rejected"])

    torch.manual_seed(spec["seed"])
    train(cfg, callbacks=[Watch()])
    probe_after = matmul_gflops()
    # After the timed steps: the tokenized split (the trainer's cache) against the data's ids.
    data = load_preference_data(cfg.data, build_tokenizer(cfg), seed=cfg.train.seed)
    rec.check_token_ids(data.train)
    first_step = rec.step_end_times[0] if rec.step_end_times else time.perf_counter()
    rec.dump(
        out,
        system="preftune",
        reference=resolved_reference_strategy(cfg),
        flags={
            "prefix_sharing": cfg.train.prefix_sharing,
            "chunk_size": cfg.train.chunk_size,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "compile": cfg.train.compile,
            "overrides": spec.get("preftune_set") or [],
        },
        matmul_before=probe_before,
        matmul_after=probe_after,
        setup_s=first_step - t0,
        peak_rss_end_kib=peak_rss_kib(),
        threads=torch.get_num_threads(),
    )


def worker_trl(spec: dict, out: Path) -> None:
    from _common import matmul_gflops, peak_rss_kib

    probe_before = matmul_gflops()
    t0 = time.perf_counter()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rec = Recorder(spec)
    work = Path(spec["work"])
    mode = spec["mode"]
    if mode not in ("default", "precomputed", "padded", "exact"):
        raise ValueError(f"TRL has no counterpart of mode {mode!r}")

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()

    orig_compute_loss = DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = orig_compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            rec.batch(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            if len(rec.losses) < 4:
                loss = result[0] if isinstance(result, tuple) else result
                rec.losses.append(loss.detach().double())
                metrics = self._metrics["train"]
                rec.logps_chosen.append(metrics["logps/chosen"][-1])
                rec.logps_rejected.append(metrics["logps/rejected"][-1])
        return result

    DPOTrainer.compute_loss = compute_loss

    dataset = load_dataset(
        "json", data_files=spec["data_file"], split="train", cache_dir=str(work / "hf")
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    ref_model = None
    if spec["ref_model_dir"]:
        ref_model = AutoModelForCausalLM.from_pretrained(
            spec["ref_model_dir"], dtype=torch.float32, attn_implementation="sdpa"
        )
    args = DPOConfig(
        output_dir=str(work / "out"),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        loss_type=["sigmoid"],
        beta=BETA,
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        padding_free=False,  # disabled in 1.16 anyway (warns and pads)
        precompute_ref_log_probs=mode == "precomputed",
        precompute_ref_batch_size=spec["batch"],
        gradient_checkpointing=False,  # DPOConfig defaults to True
        bf16=False,  # DPOConfig defaults to True
        fp16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=True,
        seed=spec["seed"],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    probe_after = matmul_gflops()
    first_step = rec.step_end_times[0] if rec.step_end_times else time.perf_counter()
    rec.dump(
        out,
        system="trl",
        reference="precomputed" if mode == "precomputed" else "copy",
        flags={
            "optim": str(args.optim),
            "gradient_checkpointing": args.gradient_checkpointing,
            "padding_free": args.padding_free,
            "bf16": args.bf16,
        },
        matmul_before=probe_before,
        matmul_after=probe_after,
        setup_s=first_step - t0,
        peak_rss_end_kib=peak_rss_kib(),
        threads=torch.get_num_threads(),
    )


def worker_fp64(spec: dict, out: Path) -> None:
    """The step-1 loss of the exactness batch in float64 with plain full logits: the judge of both systems."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    rec = Recorder(spec)
    pairs = rec.expected[: spec["batch"]]
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    starts = [len(p) for p, _, _ in pairs] * 2

    def logps(path: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, attn_implementation="eager"
        )
        model.eval()
        sums = []
        with torch.no_grad():
            for seq, start in zip(seqs, starts):  # one row at a time: no padding at all
                ids = torch.tensor([seq])
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
                picked = logp.gather(1, ids[0, 1:, None])[:, 0]
                sums.append(picked[start - 1 :].sum())
        return torch.stack(sums)

    pol = logps(spec["model_dir"])
    ref = logps(spec["ref_model_dir"])
    b = len(pairs)
    margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    loss = -F.logsigmoid(BETA * margin).mean()
    Path(out).write_text(
        json.dumps(
            {
                "system": "fp64",
                "loss": float(loss),
                "logps_chosen_mean": float(pol[:b].mean()),
                "logps_rejected_mean": float(pol[b:].mean()),
            }
        )
    )
