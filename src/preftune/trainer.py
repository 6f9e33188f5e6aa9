"""The training loop: policy + reference + preference pairs -> a better model folder.

Read :func:`train` top to bottom: set up the run, then one optimizer step per window of micro-batches.
Gradient accumulation is exact (docs/FORMULAS.md "Exact accumulation"): every micro-batch loss is divided by the pair and token totals
of its whole window (and of all ranks), so k micro-steps give the gradient of one big batch. The loss is
whatever ``cfg.loss`` names; the loop never looks at the name.

Under ``torchrun`` the same loop runs on every rank; :mod:`preftune.distributed` holds the machinery
(``dist``: the process group and its collectives; ``wrap``: DDP/FSDP2; ``dist_checkpoint``: distributed
checkpoints), so here it shows only as one-line calls. Every rank runs the same number of micro-steps: an
empty share of a batch becomes a zero-weight placeholder. One window's forward and backward is
:func:`preftune.objective.window_backward`; what happens around the loop (start, resume, stop, the final
folder) is :mod:`preftune.lifecycle`'s. ``callbacks`` (:mod:`preftune.callbacks`) watch every step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune import build, lifecycle
from preftune.callbacks import Callback, StepInfo
from preftune.checkpoint import DiskFullError, TrainState, is_disk_full
from preftune.config import Config, ConfigError, config_to_dict
from preftune.data import batch_indices, load_preference_data, pair_lengths
from preftune.diagnostics import Diagnostics, format_warning
from preftune.distributed import DistContext, init_distributed, wrap
from preftune.distributed import checkpoint as dist_checkpoint
from preftune.evaluation import StepMetrics, evaluate
from preftune.lifecycle import TrainingError, TrainingInterrupted
from preftune.losses import UNPAIRED_LOSSES
from preftune.model import prepare_tokenizer, resolve_device
from preftune.objective import window_backward
from preftune.runfolder import RunFolder, check_resume, run_fingerprint, write_fingerprint
from preftune.tracking import MetricsLogger, ProgressBar, read_metrics, write_json

__all__ = [
    "Callback",
    "StepInfo",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "train",
    "window_backward",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_model_dir: Path | None
    last_checkpoint: Path | None
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)


def train(
    cfg: Config, *, model=None, tokenizer=None, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train as ``cfg`` says; ``model`` / ``tokenizer``: objects in memory instead of ``model.path``'s
    (the Python API, :func:`preftune.api.train`); ``callbacks``: called after every optimizer step
    (:class:`preftune.callbacks.Callback`)."""
    device = lifecycle.check_device(resolve_device(cfg.train.device))
    dist = init_distributed(device, cfg.train.parallel, cpu_offload=cfg.train.fsdp_cpu_offload)
    with dist.running():  # a failure names its rank; the process group is torn down at the end
        if not dist.is_main:
            return _train(cfg, dist, None, model, tokenizer, callbacks)
        # Rank 0 owns the folder: locked against a second run, and removed again (or emptied) when the
        # run fails before its first step.
        with RunFolder(cfg.train.output_dir) as folder:
            return _train(cfg, dist, folder, model, tokenizer, callbacks)


def _train(
    cfg: Config, dist: DistContext, folder: RunFolder | None, model, tokenizer, callbacks
) -> TrainResult:
    t_start = time.perf_counter()
    device = dist.device
    run_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)
    autocast = build.autocast_factory(cfg, device)
    show = cfg.log.progress and dist.is_main

    # Data: tokenized once (cached; rank 0 first, the others read its cache), drops written to the run folder.
    tokenizer = build.build_tokenizer(cfg) if tokenizer is None else prepare_tokenizer(tokenizer)
    with dist.main_first():
        # Unpaired rows (KTO) only for an unpaired loss, pairs only for a pair loss: never DPO on a
        # completion against its KL row.
        unpaired = cfg.loss.name[0] in UNPAIRED_LOSSES
        data = load_preference_data(cfg.data, tokenizer, seed=cfg.train.seed, unpaired=unpaired)
    if len(data.train) == 0:
        raise TrainingError(f"no training pairs left after filtering (drops: {data.drops})")
    gen_eval = lifecycle.generation_eval(cfg, dist, run_dir)

    # Fresh start or resume, checked against the settings the run started with -- before any model loads,
    # so that a refused resume fails in seconds. The layout and reference key are compared once known.
    fp = run_fingerprint(cfg, lifecycle.run_facts(cfg, tokenizer, data, dist, model))
    source, changes = lifecycle.open_run(cfg, run_dir, fp, folder)
    resuming = bool(dist.broadcast_int(int(source is not None)))
    # The memory plan, before any model loads (never raises; None when it cannot be made).
    if dist.is_main:
        from preftune.plan import plan_for_run

        text = plan_for_run(cfg, data, dist, model=model)
        if text:
            log.info("%s", text)

    # Policy, then the layout (proven on the models by the setup probe), then the reference from θ₀, and
    # only then a checkpoint's weights.
    if dist.parallel == "fsdp" and cfg.model.lora.enabled and cfg.model.lora.merge_on_save:
        raise TrainingError("model.lora.merge_on_save is not supported with train.parallel=fsdp")
    policy_model = build.build_policy_model(cfg, dist.load_device, model)
    build.check_vocab(cfg, tokenizer, policy_model)
    ref_model = build.load_reference_model(cfg, dist.load_device)
    if ref_model is not None:
        build.check_vocab(cfg, tokenizer, ref_model, "reference.path")
    layout = build.build_layout(cfg, tokenizer, policy_model, ref_model)
    policy = layout.module(policy_model)
    reference = build.build_reference(
        cfg, policy, layout, data, ref_model=ref_model, device=device, autocast=autocast,
        progress=show, dist=dist,
    )  # fmt: skip
    del ref_model
    # TR-DPO: the reference copy follows the policy; its weights then belong in every checkpoint.
    sync = cfg.reference.sync
    extra_models = {}
    if sync.mode != "none":
        try:
            reference.check_sync(policy_model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        extra_models = {"reference": reference.weights}
    reference_key = getattr(reference, "key", None)
    fp["facts"].update(layout=layout.name, reference=reference_key)
    if dist.is_main and source is not None:
        changes += check_resume(source, fp, force=lifecycle.forced(cfg), late=True)
    model = wrap.wrap_policy(
        dist, policy
    )  # the module the forward goes through: DDP, FSDP2 or `policy`
    objective = build.build_objective(cfg)
    lengths = pair_lengths(data.train)
    # A stand-in for an empty share of a batch on this rank: the shortest pair with weight 0.
    placeholder = layout.placeholder(data.train[min(range(len(lengths)), key=lengths.__getitem__)])
    micro_per_epoch = math.ceil(len(lengths) / (cfg.train.batch_size * dist.world_size))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    optimizer = build.build_optimizer(cfg, policy_model)  # after wrapping: FSDP2 swaps parameters
    scheduler = build.build_scheduler(cfg, optimizer, total_steps)

    state = TrainState(reference_key=reference_key, extra={"world_size": dist.world_size})
    last_ckpt = None
    if resuming:

        def load(path: Path) -> TrainState:
            return lifecycle.load_state(
                path, policy_model, optimizer, scheduler, dist, reference_key, cfg, extra_models
            )

        last_ckpt, state = lifecycle.restore(cfg, run_dir, dist, load)
        log.info("resumed from %s at step %d", last_ckpt, state.step)
    # The folder records this run once every check has passed and its state is loaded.
    if dist.is_main:
        import yaml

        write_fingerprint(run_dir, fp)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        write_json(run_dir / "data_drops.json", {"rows_read": data.rows_read, "drops": data.drops})

    metrics_log = MetricsLogger.from_config(cfg, is_main=dist.is_main)
    metrics_log.truncate_after(state.step)
    metrics_log.start()  # a tracker that cannot start fails here, in one line, before step 1
    if changes:  # every difference from the run's start is on record, safe or forced
        metrics_log.log(state.step, {"changes": [c.to_dict() for c in changes]}, split="resume")
    diagnostics = None
    if cfg.log.diagnostics:
        diagnostics = Diagnostics(
            loss_names=cfg.loss.name,
            loss_weights=cfg.loss.weights,
            warmup_steps=build.warmup_steps(cfg, total_steps),
        )
    bar = ProgressBar(total=total_steps, initial=state.step, enabled=show, is_main=dist.is_main)
    if dist.is_main:
        lifecycle.log_summary(
            cfg, policy_model, layout, reference, data,
            total_steps=total_steps, warmup=build.warmup_steps(cfg, total_steps),
        )  # fmt: skip
    if diagnostics is not None:
        for finding in diagnostics.observe_setup(total_steps):
            bar.write(format_warning(finding))

    def diagnose(split: str, row: dict[str, float]) -> None:
        if diagnostics is not None:
            for finding in diagnostics.observe(split, row, step=state.step):
                bar.write(format_warning(finding))

    last_eval: dict[int, dict[str, float]] = {}  # step -> metrics: the final eval is not run twice

    def run_eval() -> dict[str, float]:
        if state.step not in last_eval:
            batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
            row = {}
            if data.eval is not None:
                row = evaluate(
                    model, reference, data.eval, layout, objective,
                    batch_size=batch_size, device=device, autocast=autocast,
                )  # fmt: skip
            if gen_eval is not None:
                row.update(gen_eval(policy_model, tokenizer, state.step))
            metrics_log.log(state.step, row, split="eval")
            bar.write("eval " + metrics_log.format_line(state.step, row))
            diagnose("eval", row)
            last_eval.clear()
            last_eval[state.step] = row
        return last_eval[state.step]

    evaluating = data.eval is not None or gen_eval is not None
    if cfg.train.eval_every and evaluating and state.step == 0:
        run_eval()  # a step-0 point: the curves start at the starting policy

    window_metrics = StepMetrics(device)
    t_log, tokens_since_log = time.perf_counter(), 0
    t_loop, tokens_total = time.perf_counter(), 0
    stop = lifecycle.StopFlag()
    try:
        while state.step < total_steps:
            batches = batch_indices(
                lengths,
                cfg.train.batch_size,
                seed=cfg.train.seed,
                epoch=state.epoch,
                group_by_length=cfg.data.group_by_length,
                rank=dist.rank,
                world_size=dist.world_size,
            )
            while state.batch_in_epoch < len(batches) and state.step < total_steps:
                t_window = time.perf_counter()
                window = batches[state.batch_in_epoch : state.batch_in_epoch + cfg.train.grad_accum]
                examples = [[data.train[i] for i in idx] for idx in window]
                micro = [layout.collate(ex) if ex else placeholder for ex in examples]
                # Throughput counts each prompt once, whatever the layout (issue 7's definition).
                counts = tuple(
                    tuple(
                        (len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"]))
                        for e in ex
                    )
                    for ex in examples
                )
                window_tokens = sum(sum(c) for micro_counts in counts for c in micro_counts)
                tokens_since_log += window_tokens
                tokens_total += window_tokens
                n_pairs = window_backward(
                    model,
                    reference,
                    micro,
                    objective,
                    layout=layout,
                    device=device,
                    autocast=autocast,
                    dist=dist,
                    metrics=window_metrics,
                )
                # The global norm (over every rank's shards), clipped to optim.max_grad_norm.
                grad_norm = wrap.clip_grad_norm(policy_model, cfg.optim.max_grad_norm)
                # One host sync per optimizer step (never per micro-step) guards the weights.
                if not bool(torch.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    if not cfg.train.skip_nonfinite:
                        raise TrainingError(
                            f"non-finite loss or gradient at step {state.step + 1}; "
                            "lower optim.lr, check model.dtype, or set train.skip_nonfinite=true",
                            last_ckpt,
                        )
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_metrics.add_grad_norm(grad_norm)
                scheduler.step()
                step_info = StepInfo(
                    tuple(tuple(idx) for idx in window), counts, time.perf_counter() - t_window
                )
                state.step += 1
                if sync.mode != "none" and state.step % sync.every == 0:
                    reference.sync_from(policy_model, 1.0 if sync.mode == "hard" else sync.alpha)
                state.batch_in_epoch += len(window)
                state.pairs_seen += n_pairs
                bar.update(1)
                if folder is not None:
                    folder.keep()  # the folder now holds results: a failure leaves it in place

                row = None
                if state.step % cfg.log.log_every == 0 or state.step == total_steps:
                    window_metrics.all_reduce(dist.all_reduce_sum)  # numbers are global
                    tokens = dist.sum(tokens_since_log)
                    elapsed = time.perf_counter() - t_log
                    row = window_metrics.pop()
                    row["learning_rate"] = scheduler.get_last_lr()[0]
                    row["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    t_log, tokens_since_log = time.perf_counter(), 0
                    metrics_log.log(state.step, row)
                    bar.set_postfix(row)
                    diagnose("train", row)
                for callback in callbacks:
                    callback.on_step_end(state.step, row, step_info)
                if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and evaluating:
                    run_eval()
                # A signal on any rank stops all of them after this step.
                stopping = dist.any(stop.requested)
                if (cfg.train.save_every and state.step % cfg.train.save_every == 0) or stopping:
                    last_ckpt = _save(
                        run_dir, state, policy_model, optimizer, scheduler, cfg, dist, extra_models
                    )
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped by {stop.signame} after step {state.step}; "
                        "resume with train.resume=auto",
                        last_ckpt,
                        stop.signum,
                    )
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0

        final_eval = run_eval() if evaluating else {}
        last_ckpt = _save(
            run_dir, state, policy_model, optimizer, scheduler, cfg, dist, extra_models
        )
        bar.close()
        final_dir = None
        if cfg.train.save_final:
            full_state = dist_checkpoint.full_state_dict(
                dist, policy_model
            )  # FSDP: gathered to rank 0; else None
            if dist.is_main:
                card = {
                    "steps": state.step,
                    "final_eval": final_eval,
                    "data_fingerprint": data.fingerprint,
                    "drops": data.drops,
                }
                lifecycle.save_final(run_dir, policy_model, tokenizer, cfg, full_state, card)
            dist.barrier()
            final_dir = run_dir / "final"
        tokens_total = dist.sum(tokens_total)  # a collective: every rank, before rank 0 reports
        if dist.is_main:
            report = {
                "steps": state.step,
                "skipped_steps": state.skipped_steps,
                "final_eval": final_eval,
                "diagnostics": diagnostics.report() if diagnostics else [],
                "layout": layout.facts(),
                "wall_time_s": time.perf_counter() - t_start,
                "tokens_per_s": tokens_total / max(time.perf_counter() - t_loop, 1e-9),
                "peak_memory_bytes": lifecycle.peak_memory_bytes(device),
                "drops": data.drops,
                "resume_changes": read_metrics(run_dir, split="resume"),
            }
            write_json(run_dir / "report.json", report)
            metrics_log.summary(report)
    except Exception as e:
        # Disk full anywhere (a checkpoint, the final model, the metrics): the message names where, and
        # the last complete checkpoint is intact (a save writes a temporary folder first).
        if is_disk_full(e) and not isinstance(e, TrainingError):
            text = (
                str(e) if isinstance(e, DiskFullError) else lifecycle.no_space_message(e, run_dir)
            )
            raise TrainingError(text, last_ckpt) from e
        raise
    finally:
        stop.restore()
        metrics_log.close()
    return TrainResult(run_dir, final_dir, last_ckpt, state.step, final_eval)


# ---------------------------------------------------------------------------------------------------
# Helpers the loop calls


def _save(
    run_dir, state, model, optimizer, scheduler, cfg, dist: DistContext, extra_models=None
) -> Path:
    """Collective: every rank calls it (rank 0 writes; FSDP ranks write their shards)."""
    return dist_checkpoint.save(
        dist,
        run_dir,
        state,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        keep_last=cfg.train.keep_last,
        extra_models=extra_models,
    )
