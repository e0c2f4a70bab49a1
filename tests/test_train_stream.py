"""``trainer.train`` on streamed webdataset shards: bad data counted into metrics and W&B, the position
saved in checkpoints (merged over ranks) and refused for other data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from corpus import build_clean_corpus, build_corrupt_corpus
from test_concat_tasks import CONCAT_TINY
from train_helpers import latest, losses, run
from wandb_records import history_by_step, offline_run_files, read_wandb_records

STREAM = ["data=webdataset", "data.image_size=16", "data.image_keys=[jpg,png]", "data.shuffle_buffer=4",
          "data.crop=random", "data.flip_prob=0.5", "eval.prompts=[a photo]"]


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / latest(run_dir) / "trainer_state.json").read_text())


def _drawn(state: dict) -> int:
    """Raw samples the position says its canonical streams drew (delivered or skipped as bad)."""
    return sum(c["draws"] for c in state["data"]["cursors"].values())


def test_streamed_training_counts_bad_data_and_refuses_other_data(tmp_path: Path) -> None:
    corpus = build_corrupt_corpus(tmp_path / "data")
    urls = "[" + ",".join(corpus["urls"]) + "]"
    run_dir = tmp_path / "run"
    overrides = STREAM + [f"data.urls={urls}", "data.num_workers=1", "train.max_steps=4"]
    run(run_dir, overrides)
    state = _state(run_dir)
    assert state["data"]["kind"] == "stream" and state["data"]["delivered"] == 4 * 8
    assert sum(state["data"]["skipped"].values()) > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data_skipped"] == state["data"]["skipped"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("data/skipped_") for rec in logged for k in rec)
    (wandb_file,) = offline_run_files(run_dir)  # the counts reach W&B too
    last = history_by_step(read_wandb_records(wandb_file))[4]
    assert {f"data/skipped_{r}": n for r, n in state["data"]["skipped"].items()} == \
        {k: v for k, v in last.items() if k.startswith("data/skipped_")}

    # Resume (2 workers now) continues the same position: 6 steps in all.
    run(run_dir, STREAM + [f"data.urls={urls}", "data.num_workers=2", "train.max_steps=6"])
    state = _state(run_dir)
    assert state["step"] == 6 and state["data"]["delivered"] == 6 * 8

    # Other data: refused, naming the difference; data.reset_position=true starts it afresh.
    proc = run(run_dir, STREAM + [f"data.urls={urls}", "data.seed=3", "train.max_steps=7"], expect=None)
    assert proc.returncode != 0 and "data.seed: saved 0, now 3" in proc.stderr + proc.stdout
    run(run_dir, STREAM + [f"data.urls={urls}", "data.seed=3", "train.max_steps=7", "data.reset_position=true"])
    assert _state(run_dir)["data"]["seed"] == 3


@pytest.mark.slow
def test_two_ranks_merge_their_positions(tmp_path: Path) -> None:
    from corpus import build_clean_corpus

    urls = build_clean_corpus(tmp_path / "data", n_shards=4, per_shard=40)
    run_dir = tmp_path / "run"
    run(run_dir, STREAM + ["data.urls=[" + ",".join(urls) + "]", "data.num_workers=2", "data.shuffle_buffer=0",
                           "train.max_steps=3", "checkpoint.interval_steps=3"], nproc=2)
    state = _state(run_dir)
    # Both ranks' consumption is in the one saved position: 3 steps x 8 samples, nothing skipped.
    assert state["data"]["delivered"] == 24 and _drawn(state) == 24
    assert state["data"]["units_consumed"] == 6  # 3 steps x 2 micro-batches of 4
    cursors = state["data"]["cursors"]
    # 4 streams; global micro-batch i (4 samples) comes from stream i % 4, so units 0..5 are 2, 2, 1, 1 per stream.
    assert {k: c["draws"] for k, c in cursors.items()} == {"0": 8, "1": 8, "2": 4, "3": 4}


@pytest.mark.slow
def test_a_resized_streamed_run_continues_the_uninterrupted_one_bitwise(tmp_path: Path) -> None:
    """2 ranks x 2 workers for 10 steps vs the same run stopped after step 3, resumed on 2 ranks x 1
    worker to step 6 and back on 2 x 2: the losses after each resume are bitwise those of the
    uninterrupted run (fp32), across the epoch boundary (80 samples, 8 a step), and the final data
    positions are the same."""
    from corpus import build_clean_corpus

    urls = build_clean_corpus(tmp_path / "data", n_shards=8, per_shard=10)
    common = STREAM + ["data.urls=[" + ",".join(urls) + "]", "checkpoint.interval_steps=100"]
    ref_dir = tmp_path / "ref"
    run(ref_dir, common + ["data.num_workers=2", "train.max_steps=10"], nproc=2, timeout=900)
    run_dir = tmp_path / "run"
    for workers, steps in ((2, 3), (1, 6), (2, 10)):
        run(run_dir, common + [f"data.num_workers={workers}", f"train.max_steps={steps}"], nproc=2, timeout=900)
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    assert all(got[s] == ref[s] for s in range(1, 11)), {s: (got[s], ref[s]) for s in ref}
    want, have = _state(ref_dir)["data"], _state(run_dir)["data"]
    assert have["cursors"] == want["cursors"] and have["units_consumed"] == want["units_consumed"] == 20
    assert max(sub[0] for c in have["cursors"].values() for sub in c["subs"]) >= 1  # across the epoch boundary


# Issue 18's tasks on streamed shards: class labels by name from the .json through a label map, and the
# two concat tasks (their masks and degradations drawn from each sample's position).
LABELS = ("cat", "dog", "bird")
STREAMED_TASKS = {
    "class": ["model/conditioning=class", f"model.conditioning.num_classes={len(LABELS)}", "data.label_key=json:label"],
    "lowres": CONCAT_TINY["lowres"],
    "masked_image": CONCAT_TINY["masked_image"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(STREAMED_TASKS))
def test_each_new_task_resumes_a_streamed_run_exactly_once_and_bitwise(tmp_path: Path, task: str) -> None:
    """2 ranks, 4 shards of 8 (an epoch is 4 steps of 8): 6 steps straight vs stopped after step 3 (mid
    epoch) and resumed to 6 (into the next). The losses and final EMA weights are bitwise the uninterrupted
    run's and the final positions the same; at the epoch's end (step 4, after the resume) each stream has
    drawn its shard exactly once: 32 draws for 32 delivered samples, nothing skipped."""
    urls = build_clean_corpus(tmp_path / "data", n_shards=4, per_shard=8, labels=LABELS)
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({name: i for i, name in enumerate(LABELS)}))
    task_overrides = STREAMED_TASKS[task] + ([f"data.label_map={label_map}"] if task == "class" else [])
    common = STREAM + task_overrides + ["eval.prompts=[]", "data.urls=[" + ",".join(urls) + "]", "data.num_workers=1",
                                        "checkpoint.interval_steps=2", "checkpoint.keep_last=3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run(ref_dir, common + ["train.max_steps=6"], nproc=2)
    run(run_dir, common + ["train.max_steps=3"], nproc=2)
    run(run_dir, common + ["train.max_steps=6"], nproc=2)
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert all(got[s] == ref[s] for s in range(1, 7)), {s: (got[s], ref[s]) for s in ref}
    assert len(set(ref.values())) == 6
    want, have = _state(ref_dir)["data"], _state(run_dir)["data"]
    assert have["cursors"] == want["cursors"] and have["units_consumed"] == want["units_consumed"] == 12
    ema_ref, ema_got = (load_file(str(d / "checkpoints" / "step00000006" / "ema.safetensors")) for d in (ref_dir, run_dir))
    assert ema_ref.keys() == ema_got.keys() and all(ema_ref[k].equal(ema_got[k]) for k in ema_ref)
    if task == "class":
        assert any(k.startswith("class_embedder.") for k in ema_ref)
    # The epoch's end, in the resumed run: 4 canonical streams (2 ranks x 2), one shard of 8 each, every
    # one drawn once through - 32 draws, 32 delivered, nothing skipped - and none into the next epoch.
    epoch_end = json.loads((run_dir / "checkpoints" / "step00000004" / "trainer_state.json").read_text())
    data = epoch_end["data"]
    assert data["delivered"] == 32 and _drawn(epoch_end) == 32 and not sum(data["skipped"].values())
    assert {k: c["draws"] for k, c in data["cursors"].items()} == {str(k): 8 for k in range(4)}
    assert data["units_consumed"] == 8 and all(sub[0] == 0 for c in data["cursors"].values() for sub in c["subs"])
