"""The streaming pipeline: exactly-once elastic resume, bad data counted, S3 through a real server
(and through its failure), bucketing, per-sample determinism, clear errors."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import build_clean_corpus, build_corrupt_corpus, corpus_keys
from data_pipeline.decode import Transform
from data_pipeline.position import Position, SourceInfo
from data_pipeline.sources import RetryPolicy, S3Options, expand_urls
from data_pipeline.stream import EmptySourceError, StreamingBatches, StreamSpec

N_SHARDS, PER_SHARD = 6, 10


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[list[str], set[str]]:
    root = tmp_path_factory.mktemp("clean")
    urls = build_clean_corpus(root, n_shards=N_SHARDS, per_shard=PER_SHARD)
    return urls, corpus_keys(root)


def _spec(urls, *, batch_size=4, shuffle_buffer=8, **kw) -> StreamSpec:
    return StreamSpec(sources=(SourceInfo("default", tuple(urls)),), weights=(1.0,), image_size=16,
                      batch_size=batch_size, shuffle_buffer=shuffle_buffer, **kw)


class Job:
    """``world`` ranks of one job, stepped together as the trainer steps them."""

    def __init__(self, spec: StreamSpec, world: int, workers: int, state: dict | None = None, *,
                 global_batch: int | None = None) -> None:
        self.spec = spec
        global_batch = global_batch or spec.batch_size * world
        accum, rest = divmod(global_batch, spec.batch_size * world)
        assert accum >= 1 and rest == 0, (global_batch, spec.batch_size, world)
        self.ranks = [StreamingBatches(spec, rank=r, world_size=world, num_workers=workers,
                                       gradient_accumulation=accum) for r in range(world)]
        if state is not None:
            for r in self.ranks:
                r.load_state_dict(state)
        self.delivered: list[tuple] = []  # (epoch, key) of every sample consumed, in global order
        self.steps: list[list[tuple]] = []  # per optimizer step: (key, epoch, position) in global order

    def step(self) -> None:
        units = []
        for r in self.ranks:
            for batch in r.step_batches():
                units.append((batch["unit"], [(k, i[1], p) for k, i, p in
                                              zip(batch["keys"], batch["ids"], batch["positions"])]))
        step = [x for _, samples in sorted(units, key=lambda u: u[0]) for x in samples]
        self.steps.append(step)
        self.delivered += [(e, k) for k, e, _ in step]

    def run(self, steps: int) -> "Job":
        for _ in range(steps):
            self.step()
        return self

    def state(self) -> dict:
        return json.loads(json.dumps(Position.merged([r.local_state() for r in self.ranks])))  # what a checkpoint holds

    def epoch_closed(self, epoch: int) -> bool:
        """Every canonical stream has drawn all of its share of ``epoch`` (and has none waiting in a group)."""
        cursors = self.state()["cursors"].values()
        return all(min(sub[0] for sub in c["subs"]) > epoch and not c.get("pending") for c in cursors)

    def close(self) -> None:
        for r in self.ranks:
            r.close()


def _stopped_and_resumed(spec: StreamSpec, layouts: list[tuple[int, int]], stops: list[int], total: int,
                         global_batch: int) -> list[list[tuple]]:
    """The steps of a run that is stopped at each of ``stops`` and resumed on the next layout."""
    steps, state = [], None
    bounds = [0, *stops, total]
    for (world, workers), a, b in zip(layouts, bounds, bounds[1:]):
        job = Job(spec, world, workers, state, global_batch=global_batch)
        job.run(b - a)
        state = job.state()
        job.close()
        steps += job.steps
    return steps


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[str]:
    """6 shards x 10 samples in three aspect ratios."""
    return build_clean_corpus(tmp_path_factory.mktemp("mixed"), n_shards=6, per_shard=10,
                              sizes=((64, 32), (32, 64), (48, 48)))


BUCKETS = ((16, 32), (16, 16), (32, 16))  # (h, w)


FAST_CASES = {("epoch", False, (1, 1)), ("epoch", True, (1, 4)), ("resampled", False, (2, 1)),
              ("resampled", True, (1, 1))}  # one per mode and bucketing; the other layouts in the slow tier


@pytest.mark.parametrize("mode, buckets, resume_layout", [
    pytest.param(mode, buckets, layout, id=f"{mode}-{'buckets' if buckets else 'square'}-{layout[0]}x{layout[1]}",
                 marks=() if (mode, buckets, layout) in FAST_CASES else pytest.mark.slow)
    for mode in ("epoch", "resampled") for buckets in (False, True) for layout in ((1, 1), (1, 4), (2, 1), (2, 2))])
def test_global_order_is_the_same_whatever_the_layout_and_resumes(mixed, mode, buckets, resume_layout) -> None:
    """2 ranks x 2 workers uninterrupted vs stopped at a random step, resumed on another layout and
    then back on 2 x 2: the same samples in the same order in every global batch, across an epoch
    boundary (60 samples, 8 a step)."""
    spec = _spec(mixed, shuffle_buffer=7, mode=mode, buckets=BUCKETS if buckets else ())
    total = 14
    reference = Job(spec, 2, 2, global_batch=8).run(total)
    reference.close()
    rnd = random.Random(f"{mode}{buckets}{resume_layout}")
    first = rnd.randint(1, 6)
    second = rnd.randint(first + 1, total - 1)
    got = _stopped_and_resumed(spec, [(2, 2), resume_layout, (2, 2)], [first, second], total, 8)
    assert got == reference.steps
    if mode == "epoch":
        epochs = Counter(e for e, _ in reference.delivered)
        assert epochs[0] == 60 and epochs[1] > 0  # it crossed an epoch boundary
        assert Counter(k for e, k in reference.delivered if e == 0) == Counter(corpus_keys(Path(mixed[0]).parent))


def test_layout_does_not_change_the_order(mixed) -> None:
    spec = _spec(mixed, shuffle_buffer=5, num_streams=4)
    runs = [Job(spec, world, workers, global_batch=16).run(5) for world, workers in ((1, 0), (1, 2), (2, 0), (4, 1))]
    for job in runs:
        job.close()
    assert all(job.steps == runs[0].steps for job in runs[1:])


def test_epochs_are_epochs_on_a_source_smaller_than_the_buffers(tmp_path: Path) -> None:
    """100 samples read by 2 ranks x 2 workers with a shuffle buffer of 1000: each run of 100
    consecutive samples is the source once, all of one epoch, epoch after epoch (issue 20, item 5)."""
    urls = build_clean_corpus(tmp_path, n_shards=4, per_shard=25)
    keys = corpus_keys(tmp_path)
    spec = _spec(urls, batch_size=5, shuffle_buffer=1000)
    job = Job(spec, 2, 2, global_batch=20).run(5)
    state = job.state()
    job.close()
    resumed = Job(spec, 1, 4, state, global_batch=20).run(10)  # and resumed in the middle of epoch 0
    resumed.close()
    delivered = job.delivered + resumed.delivered
    assert len(delivered) == 300
    for e in range(3):
        chunk = delivered[e * 100:(e + 1) * 100]
        assert {ep for ep, _ in chunk} == {e}
        assert sorted(k for _, k in chunk) == sorted(keys)
    assert [k for _, k in delivered[:100]] != [k for _, k in delivered[100:200]]  # reshuffled each epoch
    assert len(json.dumps(resumed.state())) < 2048


def test_position_for_100k_shards_is_kilobytes(capsys) -> None:
    """A LAION-scale source: the position does not grow with the number of shards."""
    import time

    from data_pipeline.position import StreamCursor, SubCursor, stream_shards

    info = SourceInfo("laion", tuple(f"s3://laion/{i:06d}.tar" for i in range(100_000)))
    pos = Position([info], seed=3, mode="epoch", num_streams=64, unit_size=32)
    rng = np.random.default_rng(0)
    for k in range(64):
        pos.cursors[k] = StreamCursor(int(rng.integers(10**9)), [SubCursor(2, int(rng.integers(10**5)), 1562,
                                                                             int(rng.integers(10**4)), 17)])
    pos.units_consumed = 64 * 10**6
    t0 = time.perf_counter()
    text = json.dumps(pos.to_state())
    t1 = time.perf_counter()
    again = Position([info], seed=3, mode="epoch", num_streams=1, unit_size=32)
    again.load_state(json.loads(text))
    t2 = time.perf_counter()
    shards = stream_shards(100_000, seed=3, source=0, stream=5, num_streams=64, epoch=2, mode="epoch", shuffle=True)
    t3 = time.perf_counter()
    with capsys.disabled():
        print(f"\nposition of 100,000 shards x 64 streams: {len(text) / 1024:.1f} KB; save {1e3 * (t1 - t0):.1f} ms, "
              f"restore {1e3 * (t2 - t1):.1f} ms, one stream's shard order {1e3 * (t3 - t2):.1f} ms")
    assert len(text) < 16 * 1024
    assert again.to_state() == json.loads(text)
    assert len(shards) in (1562, 1563) and len(set(shards)) == len(shards)


def test_mismatched_position_names_what_differs(clean, tmp_path: Path) -> None:
    urls, _ = clean
    job = Job(_spec(urls), world=1, workers=0)
    job.step()
    state = job.state()
    job.close()
    other = StreamingBatches(_spec(urls[:-1]), rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"(?s)saved 6 shards .* now 5.*data.reset_position=true"):
        other.load_state_dict(state)
    reseeded = StreamingBatches(_spec(urls, seed=1), rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"data.seed: saved 0, now 1"):
        reseeded.load_state_dict(state)
    reseeded.load_state_dict(state, reset=True)  # the user asks to start afresh
    assert reseeded.next_batch()["ids"][0][1] == 0


def test_too_few_shards_for_the_streams_is_a_clear_error(clean) -> None:
    urls, _ = clean
    with pytest.raises(ValueError, match=r"has 2 shard\(s\) but 4 canonical streams need at least one each"):
        StreamingBatches(_spec(urls[:2], exact_epochs="false"), rank=0, world_size=2, num_workers=2).next_batch()
    with pytest.raises(ValueError, match=r"has 2 shard\(s\) but 3 canonical streams"):
        StreamingBatches(_spec(urls[:2], num_streams=3, exact_epochs="false"), rank=0, world_size=1)


def test_a_layout_that_cannot_drive_the_streams_is_refused_with_the_ones_that_can(clean) -> None:
    urls, _ = clean
    job = Job(_spec(urls), world=2, workers=2)  # 4 canonical streams
    job.step()
    state = job.state()
    job.close()
    for world, workers in ((1, 3), (3, 1), (2, 4)):
        b = StreamingBatches(_spec(urls), rank=0, world_size=world, num_workers=workers)
        with pytest.raises(ValueError, match=r"4 canonical streams.*cannot share evenly.*1x\{1,2,4\}, 2x\{1,2\}, "
                                             r"4x\{1\}"):
            b.load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.num_streams=-1"):
        _spec(urls, num_streams=-1)


def test_random_crops_and_flips_depend_on_the_sample_not_the_layout(clean) -> None:
    urls, _ = clean
    spec = _spec(urls, transform=Transform(crop="random", flip_prob=0.5))
    images: dict[str, list[torch.Tensor]] = {}
    for world, workers in ((1, 0), (2, 2)):
        job = Job(spec, world, workers)
        for _ in range(4):
            for r in job.ranks:
                b = r.next_batch()
                for key, (_, epoch, _, _), img in zip(b["keys"], b["ids"], b["images"]):
                    if epoch == 0:
                        images.setdefault(key, []).append(img)
        job.close()
    both = [v for v in images.values() if len(v) == 2]
    assert len(both) >= 4
    assert all(torch.equal(a, b) for a, b in both)


def test_corrupt_corpus_is_skipped_and_counted_exactly(tmp_path: Path) -> None:
    corpus = build_corrupt_corpus(tmp_path)
    spec = _spec(corpus["urls"], batch_size=2, image_keys=("jpg", "png"))
    job = Job(spec, world=1, workers=2)
    while not job.epoch_closed(0):
        job.step()
    state = job.state()
    job.close()
    epoch0 = [k for e, k in job.delivered if e == 0]
    assert sorted(epoch0) == sorted(corpus["good_keys"])
    # The counts cover epoch 0 and what of epoch 1 was consumed before it closed.
    assert all(state["skipped"].get(r, 0) >= n for r, n in corpus["skipped"].items())
    # Exact counts: one stream, no shuffle, one sample a batch. Epoch 0 closes with the first sample
    # of epoch 1, whose bad predecessors are those before the first sample of epoch 0.
    single = Job(_spec(corpus["urls"], batch_size=1, shuffle_buffer=0, image_keys=("jpg", "png"),
                       shuffle_shards=False, num_streams=1), world=1, workers=0)
    single.step()
    before_first = Counter(single.state()["skipped"])
    while not single.epoch_closed(0):
        single.step()
    counts = Counter(single.state()["skipped"])
    single.close()
    assert counts - before_first == corpus["skipped"]


def test_bad_data_is_skipped_at_the_same_places_after_a_resume(tmp_path: Path) -> None:
    """Truncated tar, undecodable images, missing parts: the resumed run skips them where the
    uninterrupted run does, and counts the same."""
    corpus = build_corrupt_corpus(tmp_path)
    spec = _spec(corpus["urls"], batch_size=2, shuffle_buffer=5, image_keys=("jpg", "png"))
    reference = Job(spec, 2, 2, global_batch=4).run(12)
    want = reference.state()
    reference.close()
    assert {0, 1} <= {e for e, _ in reference.delivered}  # across epoch boundaries
    steps, state = [], None
    for (world, workers), n in (((2, 2), 3), ((1, 1), 4), ((1, 4), 2), ((2, 1), 3)):
        job = Job(spec, world, workers, state, global_batch=4).run(n)
        steps += job.steps
        state = job.state()
        job.close()
    assert steps == reference.steps
    assert state["skipped"] == want["skipped"] and state["cursors"] == want["cursors"]
    assert set(state["skipped"]) == set(corpus["skipped"])


def _garbage_shards(tmp_path: Path, n: int) -> list[str]:
    urls = []
    for i in range(n):
        p = tmp_path / f"bad{i}.tar"
        p.write_bytes(b"this is not a tar archive" * 40)
        urls.append(str(p))
    return urls


def test_a_source_with_no_readable_sample_fails_clearly(tmp_path: Path) -> None:
    spec = _spec(_garbage_shards(tmp_path, 2), retry=RetryPolicy(max_retries=0))
    b = StreamingBatches(spec, rank=0, world_size=1)
    with pytest.raises(EmptySourceError, match=r"data source 'default' \(2 shards.*gave no usable sample"):
        b.next_batch()
    # Readable shards whose samples are all unusable (no caption): the same, through workers.
    root = tmp_path / "nocap"
    urls = build_clean_corpus(root, n_shards=2, per_shard=3)
    spec = _spec(urls, caption_key="json:no_such_field")
    b = StreamingBatches(spec, rank=0, world_size=1, num_workers=2)
    with pytest.raises(EmptySourceError, match="no usable sample"):
        b.next_batch()
    b.close()


def test_weighted_sources_are_mixed_and_tracked_separately(tmp_path: Path) -> None:
    a = build_clean_corpus(tmp_path / "a", n_shards=2, per_shard=20, seed=1)
    b = build_clean_corpus(tmp_path / "b", n_shards=2, per_shard=20, seed=2)
    spec = StreamSpec(sources=(SourceInfo("a", tuple(a)), SourceInfo("b", tuple(b))), weights=(3.0, 1.0),
                      image_size=16, batch_size=4, shuffle_buffer=0, seed=0)
    sb = StreamingBatches(spec, rank=0, world_size=1)
    sources = Counter()
    for _ in range(20):
        sources.update(i[0] for i in sb.next_batch()["ids"])
    assert 0.6 < sources[0] / 80 < 0.9  # weight 3:1 (binomial: 0.75 +- 0.05)
    assert list(sb.position.to_state()["sources"]) == ["a", "b"]


def test_resampled_mode_draws_shards_with_replacement(clean) -> None:
    urls, _ = clean
    sb = StreamingBatches(_spec(urls, mode="resampled", shuffle_buffer=0), rank=0, world_size=1)
    shards = [i[2] for _ in range(40) for i in sb.next_batch()["ids"]]
    runs = [shards[i] for i in range(0, len(shards), PER_SHARD)]
    assert len(set(runs)) < len(runs)  # some shard drawn twice in 16 draws of 6
    state = sb.position.to_state()
    assert state["mode"] == "resampled" and state["delivered"] == 160


def test_aspect_buckets_give_one_shape_per_batch(tmp_path: Path) -> None:
    urls = build_clean_corpus(tmp_path, n_shards=2, per_shard=12, sizes=((128, 64), (64, 128), (96, 96)))
    spec = StreamSpec(sources=(SourceInfo("d", tuple(urls)),), weights=(1.0,), image_size=64, batch_size=3,
                      shuffle_buffer=0, buckets=((32, 64), (64, 64), (64, 32)))  # (h, w)
    sb = StreamingBatches(spec, rank=0, world_size=1)
    shapes = Counter()
    for _ in range(8):
        b = sb.next_batch()
        shapes[tuple(b["images"].shape[2:])] += 1
        heights, widths = b["original_size"][:, 0], b["original_size"][:, 1]
        aspect = (widths / heights).tolist()
        assert len(set(aspect)) == 1  # one bucket per batch
    assert set(shapes) == {(32, 64), (64, 64), (64, 32)}


def test_url_patterns_globs_and_list_files(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s{i}.tar").write_bytes(b"")
    (tmp_path / "list.txt").write_text("# shards\ns0.tar\n\n" + str(tmp_path / "s2.tar") + "\n")
    assert expand_urls(str(tmp_path / "s{0..2}.tar")) == [str(tmp_path / f"s{i}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "s*.tar")) == [str(tmp_path / f"s{i}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "list.txt")) == [str(tmp_path / "s0.tar"), str(tmp_path / "s2.tar")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(str(tmp_path / "x*.tar"))
    with pytest.raises(ValueError, match="more than once"):
        expand_urls([str(tmp_path / "s0.tar"), str(tmp_path / "s{0,1}.tar")])


def test_s3_options_carry_no_credentials() -> None:
    """Keys come from the AWS environment only; what the pipeline passes around (and may log) has none."""
    opts = S3Options(endpoint_url="http://127.0.0.1:9", profile="p").storage_options()
    assert opts["endpoint_url"] == "http://127.0.0.1:9" and "key" not in opts and "secret" not in opts


def test_filters_and_json_captions(tmp_path: Path) -> None:
    from data_pipeline.decode import Filters

    urls = build_clean_corpus(tmp_path, n_shards=1, per_shard=12, sizes=((64, 48), (40, 64), (96, 96)))
    meta = {}
    with tarfile.open(urls[0]) as tar:
        for m in tar:
            if m.name.endswith(".json"):
                meta[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    bound = float(np.median([m["aesthetic"] for m in meta.values()]))
    spec = _spec(urls, batch_size=1, shuffle_buffer=0, shuffle_shards=False, caption_key="json:caption",
                 filters=Filters(min_size=45, min_scores=(("aesthetic", bound),)))
    job = Job(spec, world=1, workers=0)
    while not job.epoch_closed(0):
        job.step()
    kept = {k for e, k in job.delivered if e == 0}
    want = {k for k, m in meta.items() if min(m["width"], m["height"]) >= 45 and m["aesthetic"] >= bound}
    assert kept == want and 0 < len(kept) < len(meta)
    assert set(job.ranks[0].example_captions(99)) <= {meta[k]["caption"] for k in kept}
    skipped = job.state()["skipped"]
    assert skipped.get("filtered_min_size", 0) + skipped.get("filtered_score", 0) == len(meta) - len(kept)


def test_decompression_bombs_are_refused_before_decoding() -> None:
    from corpus import oversized_png
    from data_pipeline.decode import BadSample, open_image

    for size in ((12000, 7000), (30000, 30000)):  # below and above PIL's own bomb limit
        with pytest.raises(BadSample) as e:
            open_image(oversized_png(size), 8192 * 8192)
        assert e.value.reason == "oversized_image"


def test_an_unreachable_shard_is_retried_then_skipped_with_its_url(caplog, monkeypatch) -> None:
    from data_pipeline.shards import ShardEnd, ShardTask, read_shard
    from s3_server import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    url = "s3://nowhere/00000.tar"
    opts = S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1, max_attempts=1)
    delays = []
    items = list(read_shard(ShardTask(0, url), opts.storage_options(), RetryPolicy(max_retries=2, backoff_s=0.1),
                            sleep=delays.append))
    assert delays == [0.1, 0.2]
    assert len(items) == 1 and isinstance(items[0], ShardEnd) and items[0].status == "unreadable"
    assert url in caplog.text and "testing" not in caplog.text
    # Missing credentials are not retried: they will not appear by waiting.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    delays.clear()
    fresh = S3Options(endpoint_url=opts.endpoint_url, connect_timeout_s=1.5, max_attempts=1)  # not a cached s3fs
    (end,) = read_shard(ShardTask(0, url), fresh.storage_options(), RetryPolicy(max_retries=2), sleep=delays.append)
    assert delays == [] and end.status == "unreadable" and "Credentials" in end.error


# ----------------------------------------------------------------------------- S3


def _s3_spec(urls, endpoint, **kw) -> StreamSpec:
    return _spec(urls, s3=S3Options(endpoint_url=endpoint, connect_timeout_s=2, read_timeout_s=3, max_attempts=1),
                 storage_options=(("default_block_size", 4096),), **kw)


def test_s3_shards_stream_like_local_ones(s3_server, clean, tmp_path: Path) -> None:
    from s3_server import make_bucket, s3_storage_options, upload_tree

    urls, keys = clean
    make_bucket(s3_server.endpoint_url, "stream-same")
    upload_tree(Path(urls[0]).parent, "s3://stream-same/shards", s3_storage_options(s3_server.endpoint_url))
    s3_urls = expand_urls("s3://stream-same/shards/*.tar", s3=S3Options(endpoint_url=s3_server.endpoint_url))
    assert [u.rsplit("/", 1)[1] for u in s3_urls] == [Path(u).name for u in urls]
    local = Job(_spec(urls, shuffle_buffer=0, shuffle_shards=False), world=1, workers=0)
    remote = Job(_s3_spec(s3_urls, s3_server.endpoint_url, shuffle_buffer=0, shuffle_shards=False), world=1, workers=0)
    for _ in range(5):
        a, b = local.ranks[0].next_batch(), remote.ranks[0].next_batch()
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    local.close()
    remote.close()


def test_s3_outage_mid_epoch_loses_nothing(s3_server, fault_proxy, clean) -> None:
    from s3_server import make_bucket, s3_storage_options, upload_tree

    urls, keys = clean
    make_bucket(s3_server.endpoint_url, "stream-outage")
    upload_tree(Path(urls[0]).parent, "s3://stream-outage/shards", s3_storage_options(s3_server.endpoint_url))
    s3_urls = [f"s3://stream-outage/shards/{Path(u).name}" for u in urls]
    spec = _s3_spec(s3_urls, fault_proxy.endpoint_url, retry=RetryPolicy(max_retries=8, backoff_s=0.5, max_backoff_s=2))
    job = Job(spec, world=1, workers=2)
    job.step()
    before = fault_proxy.connections
    timer = fault_proxy.fail_for(4.0)  # reset every connection, refuse new ones, for 4 s
    steps = 0
    while not job.epoch_closed(0):
        job.step()
        steps += 1
        assert steps < 100
    timer.join()
    job.close()
    epoch0 = [k for e, k in job.delivered if e == 0]
    assert sorted(epoch0) == sorted(keys)
    assert fault_proxy.connections > before  # it reconnected after the outage
    assert not any(r for r in job.state()["skipped"])  # no shard given up


def test_a_wrong_url_fails_before_training_starts(clean, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from data_pipeline.stream import spec_from_config
    from data_pipeline.config import DataConfig

    urls, _ = clean
    missing = str(tmp_path / "nope" / "{00000..00003}.tar")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                              {"kind": "webdataset", "urls": [missing], "image_size": 16}))
    with pytest.raises(FileNotFoundError, match=r"data source 'default' \(data.urls\): the shard .*nope/00000.tar"):
        spec_from_config(cfg, 4)
    cfg.urls = list(urls)
    spec = spec_from_config(cfg, 4)
    assert spec.sources[0].urls == tuple(urls) and spec.batch_size == 4
    with pytest.raises(ValueError, match=r"data.crop='middle' is invalid"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"crop": "middle"}))


def test_a_source_whose_shards_all_fail_fails_the_run_naming_it(tmp_path: Path) -> None:
    """One dead source among good ones: a clear error naming it, not an endless 'skipped' loop."""
    good = build_clean_corpus(tmp_path / "good", n_shards=2, per_shard=6)
    spec = StreamSpec(sources=(SourceInfo("good", tuple(good)), SourceInfo("dead", tuple(_garbage_shards(tmp_path, 2)))),
                      weights=(1.0, 1.0), image_size=16, batch_size=2, shuffle_buffer=0,
                      retry=RetryPolicy(max_retries=0))
    b = StreamingBatches(spec, rank=0, world_size=1, num_workers=1)
    with pytest.raises(EmptySourceError, match=r"data source 'dead' \(2 shards.*every shard of canonical stream 0/2 "
                                               r"failed in 2 passes"):
        for _ in range(50):
            b.next_batch()
    b.close()


def test_a_stop_signal_ends_the_wait_for_slow_storage(monkeypatch) -> None:
    """A worker retrying an unreachable S3 endpoint: the stop request is seen at the next poll."""
    import time

    from trainer.runtime.lifecycle import StopWaiting
    from s3_server import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"
    spec = _spec(["s3://nowhere/00000.tar"], retry=RetryPolicy(max_retries=1000, backoff_s=1, max_backoff_s=1),
                 s3=S3Options(endpoint_url=endpoint, connect_timeout_s=1, max_attempts=1))
    stop_at = time.monotonic() + 3.0
    polls = []

    def requested() -> bool:
        polls.append(time.monotonic())
        return polls[-1] >= stop_at

    b = StreamingBatches(spec, rank=0, world_size=1, num_workers=1, stop_requested=requested, poll_s=1.0)
    with pytest.raises(StopWaiting):
        b.next_batch()
    b.close()
    assert len(polls) >= 2  # the wait went on through polls until the stop came


def test_s3_run_resumed_on_other_layouts_is_the_local_run(s3_server, mixed) -> None:
    """Through the S3 server: 2 x 2 stopped, resumed as 1 x 1 and back on 2 x 2 gives the batches an
    uninterrupted 2 x 2 run on the local copies gives (keys, order, epochs, sample positions)."""
    from s3_server import make_bucket, s3_storage_options, upload_tree

    make_bucket(s3_server.endpoint_url, "stream-resume")
    upload_tree(Path(mixed[0]).parent, "s3://stream-resume/shards", s3_storage_options(s3_server.endpoint_url))
    s3_urls = [f"s3://stream-resume/shards/{Path(u).name}" for u in mixed]
    local = Job(_spec(mixed, shuffle_buffer=7), 2, 2, global_batch=8).run(10)
    local.close()
    got = _stopped_and_resumed(_s3_spec(s3_urls, s3_server.endpoint_url, shuffle_buffer=7), [(2, 2), (1, 1), (2, 2)],
                               [3, 7], 10, 8)
    assert got == local.steps


def _unequal_corpus(root: Path, sizes: tuple[int, ...], *, bad: tuple[tuple[int, int], ...] = ()) -> list[str]:
    """Shards of ``sizes`` good samples (keys unique over the corpus); ``bad`` (shard, index) samples
    carry bytes no image decoder reads."""
    import corpus
    from data_pipeline.writer import ShardWriter

    urls = []
    for shard, n in enumerate(sizes):
        url = str(root / f"{shard:05d}.tar")
        with ShardWriter(url) as writer:
            for index in range(n):
                key = corpus.sample_key(shard, index)
                parts = corpus._good_parts(key, f"a photo number {shard}-{index}", np.random.default_rng([shard, index]),
                                           (32, 32))
                if (shard, index) in bad:
                    parts["jpg"] = b"\xff\xd8 not a jpeg"
                writer.write(key, parts)
        urls.append(url)
    return urls


def test_exact_epochs_whatever_the_shard_sizes_and_the_layout(tmp_path: Path) -> None:
    """Issue 20 item 5 with shards of unequal sizes (40, 31, 25, 20 samples: 116), 2 ranks x 2 workers,
    a buffer larger than the source, 20 samples a step: every run of 116 consecutive samples of the
    global order is one epoch, each sample once; stopped and resumed as 1 x 4 and 2 x 1, the same
    steps."""
    urls = _unequal_corpus(tmp_path, (40, 31, 25, 20))
    keys = corpus_keys(tmp_path)
    spec = _spec(urls, batch_size=5, shuffle_buffer=1000, exact_epochs="true")
    reference = Job(spec, 2, 2, global_batch=20).run(18)  # 360 samples: 3 epochs and a part
    state = reference.state()
    reference.close()
    assert state["exact_epochs"] is True and len(json.dumps(state)) < 4096
    for e in range(3):
        chunk = reference.delivered[e * 116:(e + 1) * 116]
        assert {ep for ep, _ in chunk} == {e}, e
        assert sorted(k for _, k in chunk) == sorted(keys), e
    assert [k for _, k in reference.delivered[:116]] != [k for _, k in reference.delivered[116:232]]
    got = _stopped_and_resumed(spec, [(2, 2), (1, 4), (2, 1)], [5, 11], 18, 20)
    assert got == reference.steps


def test_exact_epochs_serve_fewer_shards_than_streams_and_count_bad_samples_once_an_epoch(tmp_path: Path) -> None:
    """3 shards for 4 readers (refused before: a stream without a shard) take exact epochs by default
    (data.exact_epochs=auto); an undecodable sample is skipped, counted once per epoch job-wide, and
    the same after a resume on another layout."""
    urls = _unequal_corpus(tmp_path, (9, 7, 6), bad=((1, 3),))
    spec = _spec(urls, batch_size=3, shuffle_buffer=100)
    job = Job(spec, 2, 2, global_batch=12).run(7)  # 84 samples of 21 usable: 4 epochs
    state = job.state()
    job.close()
    assert state["exact_epochs"] is True and state["num_streams"] == 48  # 4 readers x 12: room to grow
    for e in range(4):
        chunk = job.delivered[e * 21:(e + 1) * 21]
        assert {ep for ep, _ in chunk} == {e} and len({k for _, k in chunk}) == 21
    assert state["skipped"].get("undecodable_image") == 4  # once in each epoch begun
    resumed = _stopped_and_resumed(spec, [(2, 2), (4, 1)], [3], 7, 12)
    assert resumed == job.steps
    again = Job(spec, 2, 2, global_batch=12).run(3)
    middle = again.state()
    again.close()
    after = Job(spec, 4, 1, middle, global_batch=12).run(4)
    assert after.state()["skipped"] == state["skipped"]
    after.close()


def test_exact_epochs_refuse_what_they_cannot_serve(tmp_path: Path, clean) -> None:
    urls, _ = clean
    for kw, what in (({"mode": "resampled"}, "mode='resampled'"), ({"buckets": BUCKETS}, "3 buckets"),
                     ({"shuffle_buffer": 0}, "shuffle_buffer=0")):
        with pytest.raises(ValueError, match=rf"data.exact_epochs=true needs .*{what}"):
            _spec(urls, exact_epochs="true", **kw)
    too_big = StreamingBatches(_spec(urls, shuffle_buffer=50, exact_epochs="true"), rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"more than data.shuffle_buffer=50 raw samples.*raise data.shuffle_buffer"):
        too_big.next_batch()
    too_big.close()


def test_exact_epochs_setting_is_checked_before_work() -> None:
    from data_pipeline.config import DataConfig

    with pytest.raises(ValueError, match=r"data.exact_epochs='maybe' is invalid; allowed: one of \('auto'"):
        DataConfig(kind="webdataset", urls=["/x/{0..3}.tar"], exact_epochs="maybe")
    with pytest.raises(ValueError, match=r"data.exact_epochs='true' is invalid; allowed: auto or false: "
                                         r"data.mode=resampled has no epochs"):
        DataConfig(kind="webdataset", urls=["/x/{0..3}.tar"], exact_epochs="true", mode="resampled")
    assert DataConfig(kind="webdataset", urls=["/x/{0..3}.tar"], exact_epochs=True).exact_epochs == "true"
