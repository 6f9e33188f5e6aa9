"""How a run starts, stops and ends around the training loop of :mod:`preftune.trainer`.

- **Start.** :func:`open_run` decides, on rank 0, whether this run continues a checkpoint (``train.resume``)
  or starts afresh, compares the run's fingerprint (:mod:`preftune.fingerprint`: its settings and the facts
  :func:`run_facts` measures) with the one it started with, and gives a fresh start an empty folder
  (:func:`preftune.runfolder.prepare_fresh`). :func:`restore` then loads the newest intact checkpoint.
- **Stop.** :class:`StopFlag`: SIGINT/SIGTERM finish the current step, then the loop checkpoints and stops.
- **Failures.** :class:`TrainingError` (the CLI exits 1 and names the last checkpoint) and
  :class:`TrainingInterrupted` (exit 128 + the signal number: 130 for SIGINT).
- **End.** :func:`save_final` writes ``final/``, an ordinary Hugging Face folder, atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

import torch

from preftune import build
from preftune.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    TrainState,
    checkpoint_dir_name,
    find_resumable,
    latest_checkpoint,
    load_latest_valid,
)
from preftune.checkpoint_files import step_of
from preftune.config import Config, ConfigError, resolved_reference_strategy
from preftune.data.cache import tokenizer_fingerprint
from preftune.distributed import DistContext
from preftune.distributed import checkpoint as dist_checkpoint
from preftune.model import resolve_source
from preftune.runfolder import Change, RunFolder, RunFolderError, check_resume, model_facts

__all__ = [
    "StopFlag",
    "TrainingError",
    "TrainingInterrupted",
    "check_device",
    "forced",
    "load_state",
    "log_summary",
    "no_space_message",
    "open_run",
    "peak_memory_bytes",
    "restore",
    "run_facts",
    "save_final",
]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A failure during training; ``last_checkpoint`` says where a resume would start."""

    def __init__(self, message: str, last_checkpoint: Path | None = None):
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


class TrainingInterrupted(TrainingError):
    """Stopped by a signal after a checkpoint (the CLI exits 128 + ``signum``: 130 for SIGINT)."""

    def __init__(self, message: str, last_checkpoint: Path | None, signum: int):
        super().__init__(message, last_checkpoint)
        self.signum = signum


def check_device(device: torch.device) -> torch.device:
    """``train.device`` must exist on this machine (a ConfigError before anything loads)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"train.device: {device} is not available here ({count} CUDA device(s)); "
                "expected auto, cpu or an existing cuda:N"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps is not available here; expected auto or cpu")
    return device


def generation_eval(cfg: Config, dist: DistContext, run_dir: Path):
    """The run's generation eval (the ``geneval`` section) or None; its prompts and judge are read now,
    before any model loads, so that a bad file or judge spec fails in seconds (exit 2)."""
    if not cfg.geneval.prompts:
        return None
    if dist.world_size > 1:
        raise ConfigError(
            "geneval.prompts: the generation eval during training runs in one process; under torchrun, "
            "run preftune geneval on the saved checkpoints instead"
        )
    from preftune.geneval import TrainingGenEval
    from preftune.judges import JudgeError

    try:
        return TrainingGenEval(cfg.geneval, run_dir)
    except JudgeError as e:
        raise ConfigError(f"geneval.judge: {e}") from None


def run_facts(cfg: Config, tokenizer, data, dist: DistContext, model=None) -> dict:
    """What defines the run besides its settings, cheap to measure (model files, not weights); a model
    given in memory has no files: its class and a hash of its weights stand for it."""
    dtype = cfg.model.dtype
    if dtype == "auto":  # as build.autocast_factory resolves it
        dtype = "bfloat16" if dist.device.type == "cuda" else "float32"
    facts = {
        "model": model_facts(build.model_source(cfg)) if model is None else _memory_facts(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data.fingerprint,
        "world_size": dist.world_size,
        "parallel": dist.parallel,
        "precision": dtype,
    }
    if cfg.reference.path and resolved_reference_strategy(cfg) in ("copy", "precomputed"):
        ref = resolve_source(cfg.reference.path, setting="reference.path")
        facts["reference_model"] = model_facts(ref)
    return facts


def _memory_facts(model) -> dict:
    from preftune.reference import hash_weights

    return {"in_memory": type(model).__name__, "weights": hash_weights(model)}


def forced(cfg: Config) -> bool:
    """resume=force, or an explicit checkpoint PATH (continuing it with new settings is the point)."""
    return cfg.train.resume not in ("auto", "never")


def open_run(
    cfg: Config, run_dir: Path, fp: dict, folder: RunFolder | None
) -> tuple[Path | None, list[Change]]:
    """Rank 0: the run folder whose checkpoint this run continues (None: a fresh start) and the changes
    from its start; a fresh start gets an empty folder (:func:`~preftune.runfolder.prepare_fresh`)."""
    if folder is None:
        return None, []
    resume, source = cfg.train.resume, None
    if resume not in ("auto", "never", "force"):
        source = Path(resume).parent.parent  # RUN/checkpoints/step-N
    elif resume != "never" and latest_checkpoint(run_dir) is not None:
        source = run_dir
    changes = check_resume(source, fp, force=forced(cfg)) if source is not None else []
    if source is not None and source.resolve() == run_dir.resolve():
        folder.keep()  # it holds the run being continued
    else:  # a fresh start, or a checkpoint of another folder continued here
        folder.start_fresh(overwrite=cfg.train.overwrite, fingerprint=fp)
    return source, changes


def restore(cfg: Config, run_dir: Path, dist: DistContext, load) -> tuple[Path, TrainState]:
    """Load the checkpoint to resume: the given PATH, or the newest intact one (a corrupt newest one is
    logged and skipped). Under torchrun rank 0 picks it, so that all ranks load the same one."""
    if cfg.train.resume not in ("auto", "never", "force"):
        path = Path(cfg.train.resume)
        return path, load(path)
    if not dist.enabled:
        found = load_latest_valid(run_dir, load)
        if found is None:  # removed since open_run looked
            raise CheckpointError(f"{run_dir}: its checkpoints disappeared while starting")
        return found
    step = -1
    if dist.is_main:
        found = find_resumable(run_dir)  # verified here once, not by every rank
        step = step_of(found) if found is not None else -1
    step = dist.broadcast_int(step)
    if step < 0:
        raise CheckpointError(f"{run_dir}: its checkpoints disappeared while starting")
    path = run_dir / CHECKPOINTS_DIR / checkpoint_dir_name(step)
    return path, load(path)


def load_state(
    ckpt: Path,
    model,
    optimizer,
    scheduler,
    dist: DistContext,
    reference_key,
    cfg: Config,
    extra_models: dict | None = None,
) -> TrainState:
    """Restore a checkpoint's states into the run's objects; refuse one of another world size or reference."""
    try:
        state = dist_checkpoint.load(
            dist,
            ckpt,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            extra_models=extra_models,
        )
    except CheckpointError:
        raise  # a corrupt file: load_latest_valid falls back to the checkpoint before
    except ValueError as e:
        raise TrainingError(str(e), ckpt) from e
    saved = state.extra.get("world_size", 1)
    if saved != dist.world_size:  # the data position counts per-rank micro-batches
        raise TrainingError(
            f"checkpoint {ckpt} was written by {saved} process(es), this run has {dist.world_size}; "
            "resume with the same number of processes",
            ckpt,
        )
    # Runs from before fingerprints: the checkpoint still says which precomputed reference it trained with.
    if state.reference_key and reference_key and state.reference_key != reference_key:
        if not forced(cfg):
            raise RunFolderError(
                f"checkpoint {ckpt} was trained against other precomputed reference log-probs "
                f"({state.reference_key[:12]}..., now {reference_key[:12]}...: the reference weights, "
                "data or settings differ); use another train.output_dir, or train.resume=force"
            )
        log.warning("resume: reference log-probs differ from the checkpoint's (forced)")
    state.reference_key = reference_key
    return state


def no_space_message(e: BaseException, run_dir: Path) -> str:
    where = next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None)
    return f"no space left on {where or run_dir}: {' '.join(str(e).split())[:200]}"


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def log_summary(
    cfg: Config, model, layout, reference, data, *, total_steps: int, warmup: int
) -> None:
    """The start-of-run summary (rank 0, before the first step): what will be trained, how, for how long."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    log.info(
        "model: %s, %.1fM parameters, %.1fM trainable%s",
        type(model).__name__,
        total / 1e6,
        trainable / 1e6,
        " (LoRA)" if cfg.model.lora.enabled else "",
    )
    log.info(
        "reference: %s%s",
        type(reference).__name__.removesuffix("Reference").lower() if reference else "none",
        f" (sync {cfg.reference.sync.mode} every {cfg.reference.sync.every})"
        if cfg.reference.sync.mode != "none"
        else "",
    )
    log.info(
        "schedule: %d optimizer steps of %d pairs per device (x%d accumulation), %d of %d training "
        "pairs per epoch; warm-up %d steps, then %s",
        total_steps,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        len(data.train),
        data.rows_read if isinstance(data.rows_read, int) else len(data.train),
        warmup,
        cfg.optim.scheduler,
    )


def peak_memory_bytes(device) -> int | None:
    """The process's peak memory: CUDA ``max_memory_allocated``, else the resident high-water mark."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def save_final(
    run_dir: Path, model, tokenizer, cfg: Config, state_dict=None, card: dict | None = None
) -> Path:
    """The final model as an ordinary Hugging Face folder (adapter folder with LoRA, plus merged on request),
    with the tokenizer (its chat template included), the generation config and a model card.

    ``state_dict``: the full weights gathered from FSDP shards (None: the model's own). ``card``: keyword
    arguments of :func:`preftune.modelcard.write_model_card` (steps, final eval, data fingerprint, drops).
    The saved config has ``use_cache`` back on: training turns the KV cache off, generation wants it.
    """
    from preftune.model import unwrap_causal_lm
    from preftune.modelcard import write_model_card

    final = run_dir / "final"
    tmp = run_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = unwrap_causal_lm(model).config
    config.use_cache = True
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    finally:
        config.use_cache = False
    tokenizer.save_pretrained(tmp)
    if card is not None:
        write_model_card(tmp, cfg, **card)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    if cfg.model.lora.enabled and cfg.model.lora.merge_on_save:
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(run_dir / "final-merged", safe_serialization=True)
        tokenizer.save_pretrained(run_dir / "final-merged")
        if card is not None:
            write_model_card(run_dir / "final-merged", cfg, **card)
    return final


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, checkpoint, then stop with a resume hint. A second SIGINT
    (an impatient Ctrl-C) stops at once, without that checkpoint."""

    def __init__(self):
        self.requested = False
        self.signame = ""
        self.signum = 0
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        self.signame = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
