"""``python -m eval.run checkpoint=<run dir | checkpoint root | root/tag | URL> [eval.key=value ...]``

Evaluates saved checkpoints with the protocol of ``eval`` (see ``eval/config.py``) and prints a
table; the results JSON goes to ``out`` (default: ``<checkpoint root>/eval/<tag>.json``, where the
training job writes its own scheduled evaluations).

The protocol starts from the run's own ``eval`` config (saved in the checkpoint) unless
``protocol=<name>`` picks a preset of ``conf/eval/`` (``coco_fid30k``, ``digits``, ...); ``eval.*``
arguments override either. Options:

* ``watch=true``: evaluate every checkpoint of the root that has no results yet, then keep polling
  every ``poll_interval_s`` for new ones (a SLURM job beside training: ``slurm/eval_watch.sbatch``).
  It stops when the run has reached its ``train.max_steps`` and everything is evaluated, or after
  ``idle_timeout_s`` without a new checkpoint (0: never).
* several ranks (``torchrun --nproc_per_node N -m eval.run ...`` or ``srun``): each samples its share;
  the metrics are the same as on one rank.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import fsspec
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.demo_digits import read_digits_manifest
from eval.config import EvalConfig
from eval.protocol import (build_scorers, format_table, load_reference, protocol_conditions, results_record,
                           run_protocol, sampler_fn, write_record)
from trainer.cli import unknown_key_message
from trainer.inference import check_text_to_image, load_for_inference, resolve_checkpoint, train_config_of
from trainer.runtime import distributed
from trainer.runtime.checkpoint import POINTER, CheckpointStore
from trainer.runtime.device import check_device, select_device

log = logging.getLogger("eval.run")

CONF_EVAL = Path(__file__).resolve().parents[1] / "conf" / "eval"


@dataclass
class EvalRunConfig:
    checkpoint: str = "???"
    protocol: Optional[str] = None  # a preset name in conf/eval/ or a YAML path; default: the run's eval config
    eval: dict = field(default_factory=dict)  # overrides of EvalConfig keys
    out: Optional[str] = None  # folder (or URL) of the results JSON files; default <root>/eval
    watch: bool = False
    poll_interval_s: float = 60.0
    idle_timeout_s: float = 0.0
    overwrite: bool = False  # evaluate tags that already have results again
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.checkpoint in ("???", "", None):
            raise ValueError("checkpoint=<run dir | checkpoint root | root/tag> is required")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s={self.poll_interval_s} is invalid; allowed: seconds > 0")
        if self.idle_timeout_s < 0:
            raise ValueError(f"idle_timeout_s={self.idle_timeout_s} is invalid; allowed: seconds >= 0 (0 = never)")
        check_device("device", self.device)


def parse_args(argv: list[str]) -> EvalRunConfig:
    """``key=value`` arguments (OmegaConf dotlist); ``eval.*`` keys are checked against EvalConfig later."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value; got {bad}")
    cli = OmegaConf.from_dotlist(argv)
    top = {k: v for k, v in OmegaConf.to_container(cli, resolve=True).items()}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalRunConfig), top))
    except Exception as e:  # noqa: BLE001 - OmegaConf's own errors name the key
        if isinstance(e, ValueError) and not isinstance(e, OmegaConfBaseException):
            raise
        raise ValueError(unknown_key_message(e) or f"invalid argument: {e}") from None


def protocol_config(run_eval: dict[str, Any], args: EvalRunConfig) -> EvalConfig:
    """EvalConfig defaults <- the run's (or the preset's) eval config <- ``eval.*`` arguments."""
    base: Any = run_eval
    if args.protocol:
        path = Path(args.protocol)
        if not path.suffix:
            path = CONF_EVAL / f"{args.protocol}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in CONF_EVAL.glob("*.yaml"))
            raise FileNotFoundError(f"protocol={args.protocol!r}: {path} does not exist; presets: {names}")
        base = _load_preset(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), base, args.eval)
        return OmegaConf.to_object(merged)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, ValueError) and not isinstance(e, OmegaConfBaseException):
            raise
        raise ValueError(unknown_key_message(e, prefix="eval.") or f"eval config: {e}") from None


def _load_preset(path: Path):
    """A conf/eval YAML with its Hydra ``defaults`` list (sibling presets and ``_self_``) applied."""
    node = OmegaConf.load(path)
    defaults = list(node.pop("defaults", None) or ["_self_"])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for name in defaults:
        merged = OmegaConf.merge(merged, node if name == "_self_" else _load_preset(path.parent / f"{name}.yaml"))
    return merged


class Evaluator:
    """Scorers and reference statistics built once; ``evaluate(tag_url)`` per checkpoint."""

    def __init__(self, args: EvalRunConfig, run_cfg, env, device: torch.device) -> None:
        self.args, self.env, self.device = args, env, device
        self.cfg = protocol_config(OmegaConf.to_container(OmegaConf.structured(run_cfg.eval)), args)
        self.run_cfg = run_cfg
        self.resolution = self.cfg.resolution or run_cfg.data.image_size
        if self.cfg.resolution:  # before the scorers and the reference statistics are built
            run_cfg.model.check_image_size("eval.resolution", self.cfg.resolution)
        digits = None
        if run_cfg.data.kind == "digits":
            digits = read_digits_manifest(run_cfg.data.root)
        if self.cfg.kind == "digits" and digits is None:
            raise ValueError("eval.kind='digits' needs a run trained on data.kind='digits'")
        cond = run_cfg.model.conditioning
        if cond.cross_attn == "none" and any(g != 1.0 for g in self.cfg.guidance_scales):
            raise ValueError(f"eval.guidance_scales={self.cfg.guidance_scales}: the run's model is unconditional "
                             f"(model.conditioning.cross_attn='none'); allowed: [1.0]")
        # Class models: class-balanced sampling, every class equally often.
        self.prompts, self.labels = protocol_conditions(self.cfg, cond.cross_attn, cond.num_classes, None)
        self.negative = cond.null_class if cond.cross_attn == "class" else ""
        self.scorers = build_scorers(self.cfg, digit_classifier_path=str(digits.classifier_path) if digits else None,
                                     device=device)
        self.reference, self.reference_info = None, None
        if env.rank == 0:
            self.reference, self.reference_info = load_reference(
                self.cfg, self.scorers.extractor, resolution=self.resolution,
                default=digits.val_url if digits is not None else None)

    def evaluate(self, checkpoint: str) -> Optional[dict[str, Any]]:
        model = load_for_inference(checkpoint, use_ema=self.cfg.use_ema, device=self.device)
        generate = sampler_fn(model.unet, model.encode_fn(self.device), model.first_stage, model.schedule,
                              latent_shape=model.cfg.model.latent_shape(self.resolution),
                              sampler=self.cfg.sampler, num_steps=self.cfg.num_steps, device=self.device,
                              negative=self.negative)
        result = run_protocol(self.cfg, generate, self.prompts, scorers=self.scorers,
                              reference_stats=self.reference, labels=self.labels, rank=self.env.rank,
                              world_size=self.env.world_size, gather=distributed.all_gather_object)
        if self.env.rank != 0:
            return None
        return results_record(self.cfg, result, scorers=self.scorers, reference_info=self.reference_info,
                              source=model.source, resolution=self.resolution)


def _results_url(out: str, tag: str) -> str:
    return f"{out.rstrip('/')}/{tag}.json"


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def run(args: EvalRunConfig) -> list[dict[str, Any]]:
    """Evaluate ``args.checkpoint`` (or, with ``watch``, each checkpoint of its root as it appears);
    returns the results records (rank 0)."""
    env = distributed.detect_env()
    if env.world_size > 1:
        distributed.init_process_group(env)
    device = select_device(args.device, "device", env.local_rank)
    with tempfile.TemporaryDirectory(prefix="eval-") as work:
        return _run(args, env, device, Path(work))


def _run(args: EvalRunConfig, env, device: torch.device, work: Path) -> list[dict[str, Any]]:
    point = resolve_checkpoint(args.checkpoint, work, files=())  # the state only: config and step
    check_text_to_image(point, args.checkpoint)
    root_url = args.checkpoint.rstrip("/")
    if root_url.endswith(point.tag):
        root_url = root_url[: -len(point.tag)].rstrip("/")
    elif not _exists(f"{root_url}/{POINTER}"):  # a run directory
        root_url = f"{root_url}/checkpoints"
    out = args.out or f"{root_url}/eval"
    evaluator = Evaluator(args, train_config_of(point.state), env, device)
    store = CheckpointStore(root_url, work, rank=env.rank)
    records = []

    def evaluate(tag: str) -> None:
        t0 = time.perf_counter()
        record = evaluator.evaluate(f"{root_url}/{tag}")
        if record is not None:
            url = write_record(record, _results_url(out, tag))
            print(format_table(record), flush=True)
            print(f"{record['images_per_second']:.2f} images/s (sampling + scoring, {env.world_size} rank(s)); "
                  f"wrote {url} in {time.perf_counter() - t0:.1f}s", flush=True)
            records.append(record)
        distributed.barrier()

    if not args.watch:
        evaluate(point.tag)
        return records
    idle_since = time.monotonic()
    while True:
        pending: list[str] = []
        finished = False
        if env.rank == 0:
            latest = store.latest_tag()
            # Only complete checkpoints: tags up to the pointer (a newer folder may be mid-write).
            done = [t for t in store.tags() if latest is not None and t <= latest]
            seen = {r["checkpoint"]["tag"] for r in records}
            pending = [t for t in done if (t not in seen) if args.overwrite or not _exists(_results_url(out, t))]
            if latest is not None:
                state = store.read_state(latest)
                finished = int(state["step"]) >= int(state["config"]["train"]["max_steps"])
        pending, finished = distributed.broadcast_object((pending, finished))
        for tag in pending:
            log.info("evaluating %s/%s", root_url, tag)
            try:
                evaluate(tag)
            except FileNotFoundError as e:  # pruned by training (checkpoint.keep_last) since it was listed
                log.warning("checkpoint %s disappeared before it was evaluated: %s", tag, e)
        if pending:
            idle_since = time.monotonic()
        elif finished:
            log.info("the run reached train.max_steps and every checkpoint is evaluated; stopping")
            break
        elif args.idle_timeout_s and time.monotonic() - idle_since > args.idle_timeout_s:
            log.info("no new checkpoint for %.0fs (idle_timeout_s); stopping", args.idle_timeout_s)
            break
        else:
            time.sleep(args.poll_interval_s)
    return records


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.destroy_process_group()


if __name__ == "__main__":
    main()
