"""The training loop: policy + reference + preference pairs -> a better model folder.

Read :func:`train` top to bottom: set up the run, then one optimizer step per window of micro-batches.
Gradient accumulation is exact (docs/FORMULAS.md "Exact accumulation"): every micro-batch loss is divided by the pair and token totals
of its whole window (and of all ranks), so k micro-steps give the gradient of one big batch. The loss is
whatever ``cfg.loss`` names; the loop never looks at the name.

Under ``torchrun`` the same loop runs on every rank; :mod:`preftune.distributed` (``dist``) holds the
machinery (process group, DDP/FSDP2 wrapping, global reductions, distributed checkpoints), so here it shows
only as one-line calls. Every rank runs the same number of micro-steps: an empty share of a batch becomes a
zero-weight placeholder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune import build, lifecycle
from preftune.checkpoint import DiskFullError, TrainState, is_disk_full
from preftune.config import Config, ConfigError, config_to_dict
from preftune.data import batch_indices, load_preference_data, pair_lengths
from preftune.diagnostics import Diagnostics, format_warning
from preftune.distributed import DistContext, init_distributed
from preftune.evaluation import StepMetrics, evaluate
from preftune.lifecycle import TrainingError, TrainingInterrupted
from preftune.losses import UNPAIRED_LOSSES
from preftune.model import Layout, PairBatch, prepare_tokenizer, resolve_device
from preftune.runfolder import RunFolder, check_resume, run_fingerprint, write_fingerprint
from preftune.tracking import MetricsLogger, ProgressBar, read_metrics, write_json

__all__ = ["TrainResult", "TrainingError", "TrainingInterrupted", "train", "window_backward"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_model_dir: Path | None
    last_checkpoint: Path | None
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)


def train(cfg: Config, *, model=None, tokenizer=None) -> TrainResult:
    """Train as ``cfg`` says; ``model`` / ``tokenizer``: objects in memory instead of ``model.path``'s
    (the Python API, :func:`preftune.api.train`)."""
    device = lifecycle.check_device(resolve_device(cfg.train.device))
    dist = init_distributed(device, cfg.train.parallel, cpu_offload=cfg.train.fsdp_cpu_offload)
    with dist.running():  # a failure names its rank; the process group is torn down at the end
        if not dist.is_main:
            return _train(cfg, dist, None, model, tokenizer)
        # Rank 0 owns the folder: locked against a second run, and removed again (or emptied) when the
        # run fails before its first step.
        with RunFolder(cfg.train.output_dir) as folder:
            return _train(cfg, dist, folder, model, tokenizer)


def _train(
    cfg: Config, dist: DistContext, folder: RunFolder | None, model, tokenizer
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

    # Fresh start or resume, checked against the settings the run started with -- before any model loads,
    # so that a refused resume fails in seconds. The layout and reference key are compared once known.
    fp = run_fingerprint(cfg, lifecycle.run_facts(cfg, tokenizer, data, dist, model))
    source, changes = lifecycle.open_run(cfg, run_dir, fp, folder)
    resuming = bool(dist.broadcast_int(int(source is not None)))

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
    model = dist.wrap_policy(policy)  # the module the forward goes through: DDP, FSDP2 or `policy`
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

    last_eval: dict[int, dict[str, float]] = {}  # step -> metrics: the final eval is not run twice

    def run_eval() -> dict[str, float]:
        if state.step not in last_eval:
            last_eval.clear()
            last_eval[state.step] = _run_eval(
                model, reference, data.eval, layout, objective, cfg, device, autocast, state,
                metrics_log, diagnostics, bar,
            )  # fmt: skip
        return last_eval[state.step]

    if cfg.train.eval_every and data.eval is not None and state.step == 0:
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
                window = batches[state.batch_in_epoch : state.batch_in_epoch + cfg.train.grad_accum]
                examples = [[data.train[i] for i in idx] for idx in window]
                micro = [layout.collate(ex) if ex else placeholder for ex in examples]
                # Throughput counts each prompt once, whatever the layout (issue 7's definition).
                window_tokens = sum(
                    len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                    for ex in examples
                    for e in ex
                )
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
                grad_norm = dist.clip_grad_norm(policy_model, cfg.optim.max_grad_norm)
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
                state.step += 1
                if sync.mode != "none" and state.step % sync.every == 0:
                    reference.sync_from(policy_model, 1.0 if sync.mode == "hard" else sync.alpha)
                state.batch_in_epoch += len(window)
                state.pairs_seen += n_pairs
                bar.update(1)
                if folder is not None:
                    folder.keep()  # the folder now holds results: a failure leaves it in place

                if state.step % cfg.log.log_every == 0 or state.step == total_steps:
                    dist.reduce_metrics(window_metrics)  # summed over ranks: numbers are global
                    tokens = dist.sum(tokens_since_log)
                    elapsed = time.perf_counter() - t_log
                    row = window_metrics.pop()
                    row["learning_rate"] = scheduler.get_last_lr()[0]
                    row["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    t_log, tokens_since_log = time.perf_counter(), 0
                    metrics_log.log(state.step, row)
                    bar.set_postfix(row)
                    _diagnose(diagnostics, row, "train", bar, state.step)
                if (
                    cfg.train.eval_every
                    and state.step % cfg.train.eval_every == 0
                    and data.eval is not None
                ):
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

        final_eval = {}
        if data.eval is not None:
            final_eval = run_eval()
        last_ckpt = _save(
            run_dir, state, policy_model, optimizer, scheduler, cfg, dist, extra_models
        )
        bar.close()
        final_dir = None
        if cfg.train.save_final:
            full_state = dist.full_state_dict(policy_model)  # FSDP: gathered to rank 0; else None
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


def window_backward(
    model,
    reference,
    micro: list[PairBatch],
    objective,
    *,
    layout: Layout,
    device,
    autocast,
    dist: DistContext,
    metrics: StepMetrics | None = None,
) -> int:
    """Forward and backward over one window of micro-batches; gradients equal one big batch's (the MoE
    router term excepted: a load-balancing loss is a product of batch means, so it is taken per micro-batch).

    Each micro-batch loss is ``Σ w·pair_losses / N_pairs + Σ w·token_losses / N_tokens`` with the window's
    totals over all ranks (docs/FORMULAS.md "Exact accumulation"), known before the first backward, plus the model's router term
    (MoE, when asked) weighted by the micro-batch's share of the pairs. Returns the window's pair count.
    A placeholder micro-batch (weight 0, an empty share on this rank) takes part in the forward/backward
    (DDP/FSDP hooks are collectives) but adds nothing to the totals, the gradient or the metrics.
    """
    totals = dist.all_reduce_sum(
        torch.tensor(
            [sum(b.num_pairs for b in micro), sum(b.chosen_tokens for b in micro)],
            dtype=torch.float64,
        )
    )
    n_pairs, n_tokens = float(totals[0]), max(float(totals[1]), 1.0)

    def forward(batch):
        batch = batch.to(device, non_blocking=True)
        with autocast():
            return layout.logps(model, batch), reference.logps(batch) if reference else None

    # What the objective needs from the whole window before any backward (KTO's z₀; pairs: nothing).
    window = objective.prepare(micro, forward, dist.all_reduce_sum)
    for i, batch in enumerate(micro):
        batch = batch.to(device, non_blocking=True)
        with dist.grad_sync(model, sync=i == len(micro) - 1), autocast():
            pol = layout.logps(model, batch)
            ref = reference.logps(batch) if reference else None
            loss, out = objective(pol, ref, batch, n_pairs, n_tokens, window)
            # x world_size: DDP/FSDP average gradients over ranks while our totals already span them.
            (loss * dist.world_size).backward()
        if metrics is not None:  # a placeholder adds zeros (the same names on every rank)
            metrics.add(
                loss.detach(),
                objective.metrics(out, pol, batch),
                objective.terms(out, batch, n_pairs, n_tokens),
            )
    return int(n_pairs)


def _save(
    run_dir, state, model, optimizer, scheduler, cfg, dist: DistContext, extra_models=None
) -> Path:
    """Collective: every rank calls it (rank 0 writes; FSDP ranks write their shards)."""
    return dist.save_checkpoint(
        run_dir,
        state,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        keep_last=cfg.train.keep_last,
        extra_models=extra_models,
    )


def _run_eval(
    model,
    reference,
    dataset,
    layout,
    objective,
    cfg,
    device,
    autocast,
    state,
    metrics_log,
    diagnostics,
    bar,
) -> dict[str, float]:
    row = evaluate(
        model,
        reference,
        dataset,
        layout,
        objective,
        batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
        device=device,
        autocast=autocast,
    )
    metrics_log.log(state.step, row, split="eval")
    bar.write("eval " + metrics_log.format_line(state.step, row))
    _diagnose(diagnostics, row, "eval", bar, state.step)
    return row


def _diagnose(diagnostics, row, split, bar, step: int) -> None:
    if diagnostics is None:
        return
    observe = diagnostics.observe_train if split == "train" else diagnostics.observe_eval
    findings = observe(row, step=step)
    for finding in findings:
        bar.write(format_warning(finding))
