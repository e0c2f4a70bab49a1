"""The evaluation protocol end to end (issue 7): scheduled evaluation inside ``trainer.train``,
``python -m eval.run`` (one and two ranks, watch mode, bad input), the text2img protocol with the
Inception extractor, the SLURM watcher script, and the caption choice. The metric functions
themselves are covered by test_eval_metrics.py."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import train_helpers as th
from eval.protocol import read_captions

ROOT = th.ROOT
DATA_ROOT = ROOT / ".cache" / "data" / "digits16"
# 20 digit samples (2 per digit) in global batches of 3: 7 batches, the last one short, so two ranks
# draw 4 and 3 batches. guidance_scales is a sweep of two.
NUM_SAMPLES, BATCH_SIZE, SCALES = 20, 3, (1.0, 3.0)
TRAIN = ["train.max_steps=4", "checkpoint.interval_steps=2", "eval.kind=digits", "eval.samples_per_prompt=2",
         "eval.num_steps=4", "eval.interval_steps=2", f"eval.batch_size={BATCH_SIZE}",
         f"eval.guidance_scales=[{SCALES[0]},{SCALES[1]}]"]
METRIC_KEYS = ["fid", "digit_accuracy", *(f"digit_accuracy/{d}" for d in range(10))]


def _eval_run(args: list[str], nproc: int = 1, timeout: float = 300, expect: int | None = 0
              ) -> subprocess.CompletedProcess:
    proc = subprocess.run(th.python_command(["-m", "eval.run", *args], nproc), cwd=ROOT, env=th.train_env(), capture_output=True, text=True, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"eval.run exited {proc.returncode}, expected {expect}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(row: dict) -> dict:
    return {k: row[k] for k in METRIC_KEYS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """The tiny digits model, 4 steps, checkpoints and a digits evaluation every 2 steps."""
    base = tmp_path_factory.mktemp("eval_protocol")
    run_dir = base / "run"
    th.run(run_dir, [*TRAIN, f"eval.reference_cache={base / 'reference_cache'}"])
    return SimpleNamespace(run_dir=run_dir, root=run_dir / "checkpoints", base=base)


@pytest.fixture(scope="module")
def one_rank_eval(trained) -> SimpleNamespace:
    """``eval.run`` of the run directory with the run's own protocol, on one rank."""
    out = trained.base / "eval_one_rank"
    proc = _eval_run([f"checkpoint={trained.run_dir}", f"out={out}"])
    return SimpleNamespace(proc=proc, out=out, record=_read(out / "step00000004.json"))


# ----------------------------------------------------------------------------- evaluation in training


def test_training_evaluates_on_schedule_and_records_results(trained) -> None:
    eval_dir = trained.root / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["step00000002.json", "step00000004.json"]
    records = {step: _read(eval_dir / f"step{step:08d}.json") for step in (2, 4)}
    for step, record in records.items():
        assert record["format"] == "ldm-platform/eval" and record["version"] == 1
        assert record["checkpoint"]["tag"] == f"step{step:08d}" and record["checkpoint"]["step"] == step
        assert record["checkpoint"]["weights"] == "ema" and record["world_size"] == 1
        protocol = record["protocol"]
        assert protocol["kind"] == "digits" and protocol["features"] == "digits"
        assert protocol["samples_per_prompt"] == 2 and protocol["num_steps"] == 4 and protocol["resolution"] == 16
        assert protocol["guidance_scales"] == list(SCALES)
        assert record["scorers"]["features"]["name"] == "digit-classifier-hidden"
        assert record["reference"]["num_images"] > 10 and record["reference"]["source"].endswith(".tar")
        assert [row["guidance_scale"] for row in record["results"]] == list(SCALES)
        for row in record["results"]:
            assert math.isfinite(row["fid"]) and row["fid"] >= 0
            assert 0.0 <= row["digit_accuracy"] <= 1.0 and row["num_samples"] == NUM_SAMPLES
            # 2 samples per digit: the overall accuracy is the mean of the per-digit ones, in 1/20 steps
            per_digit = [row[f"digit_accuracy/{d}"] for d in range(10)]
            assert row["digit_accuracy"] == pytest.approx(np.mean(per_digit))
            assert row["digit_accuracy"] * NUM_SAMPLES == pytest.approx(round(row["digit_accuracy"] * NUM_SAMPLES))
    # The network changed between the two evaluations, so did its FID.
    assert records[2]["results"][0]["fid"] != records[4]["results"][0]["fid"]

    logged = {}
    for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "eval/fid" in entry:
            logged[entry["step"]] = entry
    assert sorted(logged) == [2, 4]
    for step, entry in logged.items():
        first, second = records[step]["results"]
        assert entry["eval/fid"] == first["fid"] and entry["eval/digit_accuracy"] == first["digit_accuracy"]
        assert entry["eval/g1/fid"] == first["fid"] and entry["eval/g3/fid"] == second["fid"]
        assert entry["eval/g3/digit_accuracy"] == second["digit_accuracy"]

    summary = _read(trained.run_dir / "metrics.json")
    assert summary["finished"] is True and summary["step"] == 4 and summary["eval_step"] == 4
    assert summary["eval_fid"] == records[4]["results"][0]["fid"]
    assert summary["eval_digit_accuracy"] == records[4]["results"][0]["digit_accuracy"]
    assert summary["eval_g3/fid"] == records[4]["results"][1]["fid"]
    assert summary["eval_num_samples"] == NUM_SAMPLES and "eval_error" not in summary
    assert summary["eval_json"] == str(trained.root / "eval" / "step00000004.json")
    assert Path(summary["eval_grid"]).is_file()


# ----------------------------------------------------------------------------- eval.run


def test_eval_run_reproduces_the_training_evaluation_and_prints_a_table(trained, one_rank_eval) -> None:
    record = one_rank_eval.record
    assert sorted(p.name for p in one_rank_eval.out.iterdir()) == ["step00000004.json"]
    assert record["checkpoint"]["tag"] == "step00000004" and record["checkpoint"]["step"] == 4
    assert record["reference"]["cached"] is True  # the training job cached the held-out digits' statistics
    in_training = _read(trained.root / "eval" / "step00000004.json")
    assert record["protocol"] == in_training["protocol"]
    # The EMA weights saved in the checkpoint give the same samples as the trainer's own copy.
    assert [_metrics(r) for r in record["results"]] == [_metrics(r) for r in in_training["results"]]

    lines = one_rank_eval.proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["guidance", "fid"])
    for line, row in zip(lines[head + 1:head + 3], record["results"]):
        cells = line.split()
        assert float(cells[0]) == row["guidance_scale"]
        assert cells[1] == f"{row['fid']:.4f}" and cells[2] == f"{row['digit_accuracy']:.4f}"
        assert cells[3] == str(NUM_SAMPLES)
    assert str(one_rank_eval.out / "step00000004.json") in one_rank_eval.proc.stdout


def test_two_ranks_give_the_metrics_of_one_rank(trained, one_rank_eval, tmp_path) -> None:
    out = tmp_path / "eval"
    _eval_run([f"checkpoint={trained.root}", f"out={out}"], nproc=2)
    record = _read(out / "step00000004.json")
    assert record["world_size"] == 2 and one_rank_eval.record["world_size"] == 1
    assert record["protocol"] == one_rank_eval.record["protocol"]
    assert [_metrics(r) for r in record["results"]] == [_metrics(r) for r in one_rank_eval.record["results"]]


# A rank of the sample-set comparison: the protocol's pieces called directly, with the generator
# wrapped to record which global batches this rank drew.
RANK_WORKER = r"""
import json, sys
import numpy as np
import torch
from data_pipeline.demo_digits import read_digits_manifest
from eval.config import EvalConfig
from eval.protocol import build_scorers, compute_metrics, digit_prompts, generate_and_score, load_reference, sampler_fn
from trainer.runtime import distributed
from trainer.inference import load_for_inference

checkpoint, out, data_root, cache = sys.argv[1:]
env = distributed.detect_env()
distributed.init_process_group(env)
cfg = EvalConfig(kind="digits", samples_per_prompt=2, num_steps=3, batch_size=3, guidance_scales=[1.0, 3.0],
                 num_grid=8, reference_cache=cache)
digits = read_digits_manifest(data_root)
scorers = build_scorers(cfg, digit_classifier_path=str(digits.classifier_path), device="cpu")
reference, _ = load_reference(cfg, scorers.extractor, resolution=16, default=digits.val_url)
model = load_for_inference(checkpoint, device="cpu")
sample = sampler_fn(model.unet, model.encode_fn(), model.first_stage, model.schedule, latent_shape=(3, 16, 16),
                    sampler=cfg.sampler, num_steps=cfg.num_steps, device="cpu")
arrays, drawn = {}, {}

def generate(prompts, seeds, guidance_scale):
    images = sample(prompts, seeds, guidance_scale)
    arrays[f"drawn_g{guidance_scale:g}_{seeds[0]:03d}"] = images.numpy()
    drawn.setdefault(f"{guidance_scale:g}", []).append(seeds[0])
    return images

prompts, labels = digit_prompts(cfg.samples_per_prompt)
metrics = {}
for g in cfg.guidance_scales:
    gathered = generate_and_score(generate, prompts, guidance_scale=g, seed=cfg.seed, batch_size=cfg.batch_size,
                                  scorers=scorers, num_grid=cfg.num_grid, rank=env.rank, world_size=env.world_size,
                                  gather=distributed.all_gather_object)
    for key in ("features", "digits", "grid"):
        arrays[f"{key}_g{g:g}"] = gathered[key]
    metrics[f"{g:g}"] = compute_metrics(gathered, reference_stats=reference, labels=labels)
np.savez(f"{out}/rank{env.rank}.npz", **arrays)
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump({"world_size": env.world_size, "drawn": drawn, "metrics": metrics}, f)
distributed.destroy_process_group()
"""


def _run_worker(tmp_path: Path, checkpoint: Path, nproc: int) -> Path:
    worker = tmp_path / "rank_worker.py"
    worker.write_text(RANK_WORKER)
    out = tmp_path / f"ranks{nproc}"
    out.mkdir()
    args = [str(worker), str(checkpoint), str(out), str(DATA_ROOT), str(tmp_path / "reference_cache")]
    env = th.train_env() | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(th.python_command(args, nproc), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _load_rank(out: Path, rank: int) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(out / f"rank{rank}.npz", allow_pickle=False) as npz:
        return _read(out / f"rank{rank}.json"), {k: npz[k] for k in npz.files}


def test_one_and_two_ranks_draw_and_gather_identical_sample_sets(trained, tmp_path) -> None:
    checkpoint = trained.root / "step00000004"
    (single, single_arrays) = _load_rank(_run_worker(tmp_path, checkpoint, 1), 0)
    out2 = _run_worker(tmp_path, checkpoint, 2)
    (rank0, arrays0), (rank1, arrays1) = _load_rank(out2, 0), _load_rank(out2, 1)
    assert single["world_size"] == 1 and rank0["world_size"] == rank1["world_size"] == 2

    # Global batch j (samples 3j..3j+2) is drawn by rank j % 2; one rank draws them all.
    for g in ("1", "3"):
        assert single["drawn"][g] == [0, 3, 6, 9, 12, 15, 18]
        assert rank0["drawn"][g] == [0, 6, 12, 18] and rank1["drawn"][g] == [3, 9, 15]
    drawn0 = {k: v for k, v in arrays0.items() if k.startswith("drawn_")}
    drawn1 = {k: v for k, v in arrays1.items() if k.startswith("drawn_")}
    drawn_single = {k: v for k, v in single_arrays.items() if k.startswith("drawn_")}
    assert not set(drawn0) & set(drawn1) and set(drawn0) | set(drawn1) == set(drawn_single)
    for key, images in {**drawn0, **drawn1}.items():
        assert images.dtype == np.uint8 and np.array_equal(images, drawn_single[key]), key

    for g in ("1", "3"):
        features, digits, grid = (single_arrays[f"{k}_g{g}"] for k in ("features", "digits", "grid"))
        assert features.shape == (NUM_SAMPLES, 64) and digits.shape == (NUM_SAMPLES,)
        assert grid.shape == (8, 3, 16, 16) and grid.dtype == np.uint8
        # The grid is the first 8 samples, in protocol order, from both ranks' batches.
        first = np.concatenate([drawn_single[f"drawn_g{g}_{s:03d}"] for s in (0, 3, 6)])[:8]
        assert np.array_equal(grid, first)
        assert len(np.unique(features.round(9), axis=0)) > 1  # different seeds, different samples
        for arrays in (arrays0, arrays1):  # both ranks hold the whole gathered set
            for key in ("features", "digits", "grid"):
                assert np.array_equal(arrays[f"{key}_g{g}"], single_arrays[f"{key}_g{g}"]), (key, g)
    assert rank0["metrics"] == single["metrics"] and rank1["metrics"] == single["metrics"]
    assert set(single["metrics"]["1"]) >= {"fid", "digit_accuracy"}


def _state_only_root(trained, tmp_path: Path) -> Path:
    """A checkpoint root holding only the pointer and the state (config, step): loading a model from
    it fails, so a check that answers first ran before any model was loaded."""
    root = tmp_path / "state_only" / "checkpoints"
    (root / "step00000004").mkdir(parents=True)
    shutil.copy(trained.root / "latest", root / "latest")
    shutil.copy(trained.root / "step00000004" / "trainer_state.json", root / "step00000004")
    return root


@pytest.mark.parametrize("args, message", [
    (["protocol=coco_fid31k"], r"protocol='coco_fid31k': .*coco_fid31k.yaml does not exist; presets: \[.*'digits'"),
    (["eval.guidance_scales=[0.5]"], r"eval.guidance_scales=\[0.5\] is invalid; allowed: a non-empty list of floats >= 1"),
    (["eval.num_stepz=3"], r"eval.num_stepz is not a key of this config; did you mean eval.num_steps"),
    (["eval.resolution=17"], r"eval.resolution=17 is invalid; allowed: a multiple of 2"),
    (["checkpoint={tmp}"], r"checkpoint='.*' is not a checkpoint: expected <root>/<tag>"),
])
def test_eval_run_rejects_bad_input_before_loading_a_model(trained, tmp_path, args, message) -> None:
    import re

    root = _state_only_root(trained, tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("checkpoint=") for a in args):
        args.insert(0, f"checkpoint={root}")
    proc = _eval_run([*args, f"out={tmp_path / 'out'}"], expect=2, timeout=120)
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and re.search(message, error[0]), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_eval_run_watch_evaluates_missing_results_and_stops_when_the_run_is_finished(trained, tmp_path) -> None:
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(trained.root, root, ignore=shutil.ignore_patterns("*optim_states.pt", "eval"))
    (root / "step00000006").mkdir()  # a checkpoint being written: newer than the pointer, no state yet
    out = tmp_path / "results"
    out.mkdir()
    (out / "step00000002.json").write_text('{"kept": true}\n')  # already evaluated
    proc = _eval_run([f"checkpoint={root}", f"out={out}", "watch=true", "poll_interval_s=0.2", "idle_timeout_s=60"],
                     timeout=240)
    assert sorted(p.name for p in out.iterdir()) == ["step00000002.json", "step00000004.json"]
    assert _read(out / "step00000002.json") == {"kept": True}
    record = _read(out / "step00000004.json")
    assert record["checkpoint"]["tag"] == "step00000004" and len(record["results"]) == len(SCALES)
    in_training = _read(trained.root / "eval" / "step00000004.json")
    assert [_metrics(r) for r in record["results"]] == [_metrics(r) for r in in_training["results"]]
    assert proc.stdout.count("checkpoint step000000") == 1  # one table: step00000004 only
    assert "reached train.max_steps" in proc.stderr and "idle_timeout_s" not in proc.stderr


# ----------------------------------------------------------------------------- failures


def test_a_failing_evaluation_is_reported_and_training_goes_on(tmp_path) -> None:
    run_dir = tmp_path / "run"
    # More sampling steps than the schedule's 1000 timesteps: the sampler raises when the evaluation runs.
    # (An eval.resolution the UNet cannot halve, this test's earlier trigger, is now refused before training.)
    th.run(run_dir, ["train.max_steps=4", "eval.kind=digits", "eval.samples_per_prompt=1", "eval.num_steps=5000",
                     "eval.interval_steps=2", f"eval.reference_cache={tmp_path / 'cache'}"])
    assert sorted(th.losses(run_dir)) == [1, 2, 3, 4] and th.latest(run_dir) == "step00000004"
    log = (run_dir / "train.log").read_text()
    for step in (2, 4):
        assert f"evaluation at step {step} failed; training continues" in log
    summary = _read(run_dir / "metrics.json")
    assert summary["finished"] is True and summary["step"] == 4
    assert "num_train_timesteps=1000" in summary["eval_error"] and summary["eval_error"].startswith("rank 0: ValueError")
    assert "eval_fid" not in summary
    failed = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("eval/failed") == 1]
    assert failed == [2, 4]
    assert not (run_dir / "checkpoints" / "eval").exists()


# ----------------------------------------------------------------------------- text2img with Inception


def test_text2img_protocol_with_inception_features(trained, tmp_path) -> None:
    from eval_helpers import write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / "random_inception.pth", seed=0)
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"a {c} handwritten {d} on a white background\n"
                                for c, d in zip(["red", "blue", "green", "black"] * 2,
                                                ["one", "two", "three", "four", "five", "six", "seven", "eight"])))
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    args = [f"checkpoint={trained.root}", "eval.kind=text2img", f"eval.captions_file={captions}",
            "eval.num_samples=6", "eval.num_steps=2", "eval.batch_size=3", "eval.guidance_scales=[1.0,2.0]",
            f"eval.inception_weights={weights}", f"eval.reference={reference}",
            f"eval.reference_cache={tmp_path / 'cache'}", "eval.resize=pil_bicubic"]

    records = []
    for name in ("first", "second"):
        proc = _eval_run([*args, f"out={tmp_path / name}"])
        records.append(_read(tmp_path / name / "step00000004.json"))
        assert "fid" in proc.stdout.split("guidance", 1)[1].splitlines()[0]
    first, second = records
    assert [row["guidance_scale"] for row in first["results"]] == [1.0, 2.0]
    for row in first["results"]:
        assert math.isfinite(row["fid"]) and row["fid"] >= 0 and row["num_samples"] == 6
        assert "digit_accuracy" not in row
    protocol = first["protocol"]
    assert protocol["kind"] == "text2img" and protocol["features"] == "inception"
    assert protocol["captions_file"] == str(captions) and protocol["num_samples"] == 6
    assert protocol["resize"] == "pil_bicubic" and protocol["reference"] == str(reference)
    features = first["scorers"]["features"]
    assert features["name"] == "inception-v3-compat-pool3" and features["dim"] == 2048
    assert features["weights_file"] == "random_inception.pth" and features["resize"] == "pil_bicubic"
    assert features["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert features["official_weights"] is False
    assert first["reference"]["source"] == str(reference) and first["reference"]["num_images"] == 4
    assert first["reference"]["cached"] is False and second["reference"]["cached"] is True
    assert second["reference"]["checksum"] == first["reference"]["checksum"]
    assert [r["fid"] for r in second["results"]] == [r["fid"] for r in first["results"]]

    missing = tmp_path / "no_such_inception.pth"
    proc = _eval_run([*[a for a in args if not a.startswith("eval.inception_weights=")],
                      f"eval.inception_weights={missing}", f"out={tmp_path / 'missing'}"], expect=2)
    assert f"error: Inception weights {missing} do not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- SLURM


def _submit_dry_run(run_dir: Path, *overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "trainer.submit", "experiment=tiny", f"run_dir={run_dir}",
                           f"data.root={DATA_ROOT}", "train.max_steps=3", "slurm.job=eval", *overrides, "--dry-run"],
                          cwd=ROOT, env=th.train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_submit_renders_the_eval_watcher(tmp_path) -> None:
    run_dir = tmp_path / "run"
    script = _submit_dry_run(run_dir, "eval.num_steps=7")
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"-m eval.run checkpoint={run_dir.resolve()}/checkpoints watch=true" in command
    assert command.endswith(" eval.num_steps=7")
    for leaked in ("train.max_steps", "experiment=", "run_dir=", "data.root", "slurm."):
        assert leaked not in command
    assert not run_dir.exists()  # a dry run writes nothing

    # A preset chosen for the job is the watcher's protocol, not silently dropped.
    command = next(line for line in _submit_dry_run(run_dir, "eval=digits", "eval.num_steps=7").splitlines()
                   if line.startswith("srun "))
    assert command.endswith(" protocol=digits eval.num_steps=7")


# ----------------------------------------------------------------------------- captions


def test_read_captions_coco_json_and_text(tmp_path) -> None:
    annotations = [{"image_id": image, "id": 10 * image + k, "caption": f" image {image} caption {k} "}
                   for image in (30, 10, 20) for k in range(5)]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": annotations}))

    chosen = read_captions(str(coco), num_samples=3, seed=0)
    assert chosen == read_captions(str(coco), num_samples=3, seed=0)  # deterministic for a seed
    images = sorted(int(c.split()[1]) for c in chosen)
    assert images == [10, 20, 30]  # one caption of each image, stripped
    assert all(c == c.strip() and c.startswith("image ") for c in chosen)
    by_seed = {tuple(read_captions(str(coco), num_samples=3, seed=s)) for s in range(8)}
    assert len(by_seed) > 1  # the seed picks which caption of each image
    assert len(read_captions(str(coco), num_samples=2, seed=0)) == 2
    with pytest.raises(ValueError, match=r"eval.num_samples=4 but eval.captions_file=.* has only 3 images"):
        read_captions(str(coco), num_samples=4, seed=0)

    text = tmp_path / "captions.txt"
    text.write_text("a cat\n\n  a dog  \na bird\n")
    assert sorted(read_captions(str(text), num_samples=3, seed=1)) == ["a bird", "a cat", "a dog"]
    assert read_captions(str(text), num_samples=2, seed=5) == read_captions(str(text), num_samples=2, seed=5)
    with pytest.raises(ValueError, match=r"eval.num_samples=4 .* has only 3 non-empty lines"):
        read_captions(str(text), num_samples=4, seed=0)
