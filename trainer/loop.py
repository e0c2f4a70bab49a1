"""The training loop: steps to ``train.max_steps`` or a stop signal, with the cadence of logging,
checkpoints and evaluation, the NaN policy and the scheduler's requeue."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.checks import check_int, invalid
from trainer.images import atomic_write_bytes
from trainer.runtime import distributed
from trainer.runtime.checkpoint import (CheckpointStore, ResumePoint, convert_to_universal, load_ema, load_rng,
                                        tag_for)
from trainer.runtime.device import DEVICES, peak_memory_gb
from trainer.runtime.ema import EMA
from trainer.runtime.engine import compiled_graph_count
from trainer.runtime.lifecycle import StopRequest, StopWaiting, requeue_slurm_job
from trainer.runtime.pickles import check_pickles, weights_only_loads
from trainer.runtime.tracking import RunTracker
from trainer.tasks.base import Task

log = logging.getLogger("trainer")


@dataclass
class TrainLoopConfig:
    max_steps: int = 1000
    # Samples per optimizer step over the whole job; split as
    # micro_batch_size * gradient_accumulation * world_size (accumulation is derived).
    global_batch_size: int = 32
    micro_batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    # This many non-finite losses in a row stop the run (each one alone is skipped and counted).
    max_consecutive_nan_steps: int = 5
    # Steps whose loss is replaced by NaN: rehearses the NaN guard end to end (tests, drills).
    inject_nan_at_steps: list[int] = field(default_factory=list)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    # Draw z ~ q(z|x) (CompVis' LatentDiffusion does); false trains on the posterior mean.
    sample_posterior: bool = True
    # The device's dense bf16 peak in TFLOP/s for MFU; 0 takes it from trainer.flops.PEAK_TFLOPS by the
    # GPU's name (no MFU on the CPU unless set).
    peak_tflops: float = 0.0
    # NHWC convolutions for the UNet and the first stage (trainer.runtime.engine.apply_channels_last):
    # what cuDNN's tensor cores want on a GPU; on the CPU it is allowed (tests) but rarely faster.
    channels_last: bool = False
    # Regional compilation (torch.compile of each UNet block and text layer, from outside the model).
    # Off by default: on the CPU inductor's compile time outweighs its gain at test sizes; on GPUs
    # measure with bench/gpu_suite.py.
    compile: bool = False

    def __post_init__(self) -> None:
        check_int("train.max_steps", self.max_steps, 1)
        check_int("train.global_batch_size", self.global_batch_size, 1)
        check_int("train.micro_batch_size", self.micro_batch_size, 1)
        check_int("train.seed", self.seed, 0)
        if self.device not in DEVICES:
            raise invalid("train.device", self.device, f"one of {DEVICES}")
        check_int("train.max_consecutive_nan_steps", self.max_consecutive_nan_steps, 1)
        check_int("train.num_threads", self.num_threads, 0)
        if not (isinstance(self.peak_tflops, (int, float)) and self.peak_tflops >= 0):
            raise invalid("train.peak_tflops", self.peak_tflops, "a number >= 0 (0: from the device's name)")

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size} x world_size={world_size}; "
                f"allowed: a multiple of {per_step}")
        return self.global_batch_size // per_step




EXIT_NAN = 3  # the process exit code when train.max_consecutive_nan_steps stopped the run
# A stop signal ended a wait for data: the ranks may be at different points of the step, so no checkpoint
# is written and a non-zero code makes the launcher stop the other ranks (issue 19 item 11).
EXIT_STOPPED_WAITING = 4


@dataclass(frozen=True)
class Cadence:
    """When the loop does what (from the ``train``, ``checkpoint``, ``eval``, ``logging``, ``ema`` and
    ``slurm`` groups)."""

    max_steps: int
    global_batch_size: int
    checkpoint_interval_steps: int
    keep_last: int
    evaluate_every: tuple[int, ...] = ()  # steps between evaluations (eval.interval_steps, image grids)
    max_consecutive_nan_steps: int = 5
    inject_nan_at_steps: frozenset[int] = frozenset()
    ema_start_step: int = 0
    ema_update_every: int = 1
    requeue_signal: str = "SIGUSR1"  # the scheduler's time-limit signal: checkpoint, stop, requeue
    max_requeues: int = 100
    peak_tflops: Optional[float] = None  # per device, for MFU (None: MFU not logged)
    compiled: bool = False  # train.compile: log the number of compiled graphs (recompiles included)

    @property
    def stop_signals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("SIGTERM", self.requeue_signal)))


@dataclass(frozen=True)
class RunInfo:
    """What every checkpoint and the run's metrics.json record about the job itself."""

    experiment: str
    world_size: int
    zero_stage: int
    precision: str
    config: dict[str, Any]  # the resolved config, secrets redacted
    config_fingerprint: str


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path
    checkpoint_dir: str
    work_dir: Path
    metrics_path: Path


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    terms: dict[str, float]
    skipped: bool  # non-finite somewhere: no optimizer step, no EMA update
    stopping: bool  # a stop signal reached some rank
    requeue: bool  # ... and it was the scheduler's time-limit signal
    seconds: float  # the step alone: evaluation and checkpoints are outside it
    flops: int = 0  # model FLOPs of this rank's micro-batches


class TrainLoop:
    """The loop of every task: optimizer steps over the task's micro-batches, the NaN policy, EMA,
    logging, checkpoints, evaluation, stop signals and requeue. Built by the composition root
    (``trainer/train.py``) from the parts it is handed."""

    def __init__(self, task: Task, *, batches, store: CheckpointStore, ema: Optional[EMA], cadence: Cadence,
                 run: RunInfo, paths: RunPaths, device: torch.device, rank: int) -> None:
        self.task, self.batches, self.store, self.ema = task, batches, store, ema
        self.cadence, self.run, self.paths, self.device, self.rank = cadence, run, paths, device, rank
        self.step = self.samples_seen = self.nan_steps = self.consecutive_nan = 0
        # This session's time inside train_step and this rank's model FLOPs there: throughput excludes
        # evaluation, checkpoints and start-up.
        self.train_seconds, self.train_flops = 0.0, 0
        self.run_id: Optional[str] = None
        self.tracker: Optional[RunTracker] = None

    # ------------------------------------------------------------------ the loop

    def train(self, tracker: RunTracker) -> int:
        """Runs to ``max_steps`` or a stop signal; returns the process exit code."""
        self.tracker, cadence = tracker, self.cadence
        stop = StopRequest(cadence.stop_signals)
        self.batches.watch_stop(lambda: stop.requested)
        start_step, t_start, exit_code, last_eval = self.step, time.time(), 0, {}
        try:
            while self.step < cadence.max_steps:
                try:
                    result = self.train_step(stop)
                except StopWaiting:
                    log.warning("stopped by %s while waiting for data in step %d; the last checkpoint (%s) is the "
                                "one to resume from", stop.received, self.step + 1, self.store.latest_tag())
                    if stop.received == cadence.requeue_signal and self.rank == 0:
                        requeue_slurm_job(cadence.max_requeues)
                    exit_code = EXIT_STOPPED_WAITING
                    break
                if self.consecutive_nan >= cadence.max_consecutive_nan_steps:
                    log.error("stopping: %d consecutive steps had a non-finite loss (train.max_consecutive_nan_steps="
                              "%d); the last checkpoint is the one to resume from after lowering optim.lr or checking "
                              "the data", self.consecutive_nan, cadence.max_consecutive_nan_steps)
                    exit_code = EXIT_NAN
                    break
                if self.step % cadence.checkpoint_interval_steps == 0 or result.stopping:
                    self.save_checkpoint()
                if result.stopping:
                    log.warning("stopped by %s after step %d with a checkpoint; run the same command to resume",
                                stop.received or "a signal on another rank", self.step)
                    if result.requeue and self.rank == 0:  # the time-limit signal, not scancel's SIGTERM
                        requeue_slurm_job(cadence.max_requeues)
                    break
                if any(self.step % n == 0 for n in cadence.evaluate_every) and self.step < cadence.max_steps:
                    last_eval = self.evaluate()
        finally:
            stop.restore()
        if exit_code == EXIT_STOPPED_WAITING:  # no collective: another rank may be inside the step's
            self.batches.close()
            self.tracker.finish(exit_code)
            return exit_code
        finished = self.step >= cadence.max_steps and exit_code == 0
        if finished:
            if self.store.latest_tag() != tag_for(self.step):
                self.save_checkpoint()
            if self.task.evaluates_at_end:
                last_eval = self.evaluate() or last_eval
        self._finish(start_step, time.time() - t_start, finished, exit_code, last_eval)
        return exit_code

    def train_step(self, stop: StopRequest) -> StepResult:
        """One optimizer step: the micro-batches' forward and backward, the step's one collective, then
        clip + optimizer step on every engine (skipped when a loss was non-finite on any rank), EMA, log."""
        t0 = time.time()
        engines = self.task.engines
        batches = self.batches.step_batches(self.samples_seen)
        inject = self.step in self.cadence.inject_nan_at_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        flops = 0
        for i, batch in enumerate(batches):
            out = self.task.micro_batch(batch, self.step)
            flops += out.flops
            loss, backward = out.loss, out.backward
            if inject:  # rehearses the NaN policy end to end
                loss = loss * float("nan")
                backward = {name: loss if value is out.loss else value for name, value in backward.items()}
            loss_sum += loss.detach().double()
            for name, value in out.terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value
            for name, value in backward.items():
                engines[name][0].backward(value)
            if i < len(batches) - 1:
                for name in backward:
                    engines[name][0].step()  # inside the accumulation: DeepSpeed only counts the micro-step
        loss_mean, terms, stopping, requeue = self._reduce(loss_sum, term_sums, len(batches), stop)
        skipped = not all(math.isfinite(v) for v in (loss_mean, *terms.values()))
        for name in backward:
            engine, optimizer = engines[name]
            optimizer.skip_next_step = skipped
            engine.step()  # the accumulation boundary: clip, optimizer step (or none), zero grads
            optimizer.skip_next_step = False
        result = StepResult(loss_mean, terms, skipped, stopping, requeue, time.time() - t0, flops)
        self.train_seconds += result.seconds
        self.train_flops += flops
        self.step += 1
        self.samples_seen += self.cadence.global_batch_size
        self._after_step(result)
        return result

    def _reduce(self, loss_sum: torch.Tensor, term_sums: dict[str, torch.Tensor], accum: int,
                stop: StopRequest) -> tuple[float, dict[str, float], bool, bool]:
        """The step's losses and stop requests, summed over ranks in one all-reduce. A NaN or inf on any
        rank makes the sum non-finite, so the same numbers are the loss to log and the skip decision."""
        names = list(term_sums)
        flags = torch.tensor([float(stop.requested), float(stop.received == self.cadence.requeue_signal)],
                             device=self.device)
        local = torch.cat([(loss_sum / accum).float().reshape(1),
                           *[(term_sums[k] / accum).float().reshape(1) for k in names], flags])
        # The step's one collective and its one deliberate host sync: the optimizer steps wait for the
        # skip decision, which needs every rank's losses.
        values = distributed.all_reduce_sum_(local).tolist()
        world = distributed.world_size()
        return (values[0] / world, {k: values[1 + i] / world for i, k in enumerate(names)},
                values[-2] > 0, values[-1] > 0)

    def _after_step(self, result: StepResult) -> None:
        """The NaN count, the EMA update and, on a logging step, the scalars."""
        if result.skipped:
            self.nan_steps += 1
            self.consecutive_nan += 1
            log.warning("step %d: non-finite loss on some rank; optimizer step and EMA update skipped "
                        "(%d skipped so far, %d in a row)", self.step, self.nan_steps, self.consecutive_nan)
        else:
            self.consecutive_nan = 0
            if self.ema is not None and self.step > self.cadence.ema_start_step \
                    and self.step % self.cadence.ema_update_every == 0:
                self.ema.update()
        self.tracker.advance(self.step)  # the live progress line with its ETA (a terminal only)
        if not self.tracker.is_log_step(self.step):
            return
        engine = self.task.main_engine
        scalars = {**self.task.log_scalars(result.loss, result.terms, self.step), "lr": engine.get_lr()[0],
                   "step_time_s": result.seconds, "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                   "mem_gb": peak_memory_gb(self.device),
                   **self._throughput(self.cadence.global_batch_size, result.flops, result.seconds)}
        skipped = self.batches.skip_counts(self.device)  # a logging step's collective
        scalars.update({f"data/skipped_{r}": n for r, n in skipped.items() if n})
        if self.cadence.compiled:
            scalars["compiled_graphs"] = compiled_graph_count()
        norm = engine.get_global_grad_norm()
        if norm is not None and not result.skipped:
            scalars["grad_norm"] = float(norm)  # a logging step's host read
        self.tracker.log_scalars(self.step, scalars)

    def _throughput(self, samples: int, flops: int, seconds: float) -> dict[str, float]:
        """samples/s over the job and per device; with FLOPs counted, achieved TFLOP/s per device and MFU."""
        if seconds <= 0:
            return {}
        out = {"samples_per_s": samples / seconds, "samples_per_s_per_device": samples / self.run.world_size / seconds}
        if flops:
            out["tflops_per_device"] = flops / seconds / 1e12
            if self.cadence.peak_tflops:
                out["mfu"] = out["tflops_per_device"] / self.cadence.peak_tflops
        return out

    def evaluate(self) -> dict[str, Any]:
        return self.task.evaluate(self.step, tracker=self.tracker, ema=self.ema,
                                  checkpoint_dir=self.paths.checkpoint_dir, run_id=self.run_id)

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``trainer_state.json``: the loop's position, the data's, and what the job was (collective:
        the data position is gathered from every rank)."""
        run = self.run
        return {"step": self.step, "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                "data": self.batches.state_dict(self.samples_seen), "wandb_run_id": self.run_id,
                "world_size": run.world_size, "zero_stage": run.zero_stage, "precision": run.precision,
                "global_batch_size": self.cadence.global_batch_size,
                "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                "config_fingerprint": run.config_fingerprint, "config": run.config, "time": time.time(), **extra}

    def save_checkpoint(self) -> str:
        """Collective: every rank writes its shards; returns the tag."""
        t0 = time.time()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        extras = self.task.checkpoint_extras(self.step)  # first: it may add to the trainer state (the latent scale)
        tag = self.store.save(self.task.main_engine, ema_state, self.trainer_state(extras.state),
                              extra_engines=extras.engines, extra_files=extras.files)
        removed = self.store.prune(self.cadence.keep_last)
        log.info("saved checkpoint %s in %.1fs%s", tag, time.time() - t0,
                 f" (removed {', '.join(removed)})" if removed else "")
        return tag

    def restore(self, point: ResumePoint, *, load_universal: bool, reset_data: bool = False) -> None:
        """Continue from ``point``: engines, step, data position, RNG states, EMA, the task's extras."""
        load_dir, tag = point.local_dir, point.tag
        check_pickles(point.local_dir / point.tag)  # before DeepSpeed (or its conversion) unpickles any of it
        if load_universal:
            load_dir, tag = convert_to_universal(point, self.paths.work_dir, rank=self.rank,
                                                 world_size=self.run.world_size)
            log.info("resuming %s saved on %s ranks on %d ranks through its universal conversion",
                     point.tag, point.state["world_size"], self.run.world_size)
        with weights_only_loads():  # DeepSpeed asks torch.load for weights_only=False
            path, _ = self.task.main_engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                                            load_optimizer_states=True, load_lr_scheduler_states=True)
            self.task.load_extras(point)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
        state = point.state
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.nan_steps = int(state.get("nan_steps", 0))
        self.run_id = state.get("wandb_run_id")
        self.batches.load_state_dict(state["data"], reset=reset_data)
        load_rng(point.local_dir / point.tag, self.rank)
        if self.ema is not None:
            ema_state = load_ema(point.local_dir / point.tag)
            if ema_state is None:
                log.warning("checkpoint %s has no EMA weights; EMA restarts from the current weights", point.tag)
            else:
                self.ema.load_state_dict(ema_state, int(state.get("ema_updates", 0)))
        log.info("resumed from checkpoint %s: step %d, %d samples seen, W&B run %s",
                 point.tag, self.step, self.samples_seen, self.run_id)

    # ------------------------------------------------------------------ the end

    def _finish(self, start_step: int, elapsed: float, finished: bool, exit_code: int,
                last_eval: dict[str, Any]) -> None:
        skipped = {r: n for r, n in self.batches.skip_counts(self.device).items() if n}
        if skipped:
            log.warning("data samples skipped so far, by reason: %s", skipped)
        if self.rank == 0:
            self._write_metrics(start_step, elapsed, finished, {**last_eval, "data_skipped": skipped})
        self.batches.close()
        self.tracker.finish(exit_code)

    def _write_metrics(self, start_step: int, elapsed: float, finished: bool, last_eval: dict[str, Any]) -> None:
        steps = self.step - start_step
        tracker, paths = self.tracker, self.paths
        throughput = self._throughput(steps * self.cadence.global_batch_size, self.train_flops, self.train_seconds)
        metrics = {"experiment": self.run.experiment, "finished": finished, "step": self.step,
                   "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                   "steps_this_session": steps, "seconds_this_session": elapsed,
                   # Throughput over the training steps alone (evaluation and checkpoints excluded).
                   "train_seconds_this_session": self.train_seconds,
                   "samples_per_second": throughput.get("samples_per_s"),
                   "samples_per_second_per_device": throughput.get("samples_per_s_per_device"),
                   "tflops_per_device": throughput.get("tflops_per_device"), "mfu": throughput.get("mfu"),
                   "peak_tflops_per_device": self.cadence.peak_tflops,
                   "wandb_run_id": self.run_id, "wandb_mode": tracker.wandb_mode,
                   "world_size": self.run.world_size, "zero_stage": self.run.zero_stage,
                   **{k.replace("eval/", "eval_"): v for k, v in last_eval.items()}}
        atomic_write_bytes(paths.metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        latest = self.store.latest_tag()
        lines = [f"run directory:   {paths.run_dir}",
                 f"checkpoints:     {paths.checkpoint_dir} (latest: {latest})",
                 f"metrics:         {paths.metrics_path}"]
        if "eval/grid" in last_eval:
            lines.append(f"samples grid:    {last_eval['eval/grid']}")
        lines += self.task.final_report(last_eval, paths.checkpoint_dir, latest)
        if tracker.wandb_run_dir is not None:
            lines.append(f"W&B ({tracker.wandb_mode}): {tracker.wandb_run_dir}"
                         + (f"  (upload: wandb sync {tracker.wandb_run_dir})" if tracker.wandb_mode == "offline" else ""))
        print("\n".join(lines), flush=True)
