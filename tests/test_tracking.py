import io
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.images import make_grid
from trainer.runtime.tracking import (REDACTED, LoggingConfig, RunTracker, format_console_line, is_secret_key,
                              new_run_id, redact, resolve_wandb_mode)

PLANTED_SECRET = "sk-planted-0123456789abcdef"


from wandb_records import _nest, history_by_step, offline_run_files, read_wandb_records, run_record  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_offline_wandb(tmp_path_factory, monkeypatch):
    """Keep wandb offline, quiet and inside tmp dirs; no git, system stats or error reporting."""
    home = tmp_path_factory.mktemp("wandb_home")
    for var, value in (("WANDB_CACHE_DIR", home / "cache"), ("WANDB_CONFIG_DIR", home / "config"),
                       ("WANDB_DATA_DIR", home / "data"), ("WANDB_DIR", home / "should_stay_empty")):
        monkeypatch.setenv(var, str(value))
    for var, value in (("WANDB_SILENT", "true"), ("WANDB_DISABLE_GIT", "true"), ("WANDB_DISABLE_CODE", "true"),
                       ("WANDB_CONSOLE", "off"), ("WANDB__DISABLE_STATS", "true"),
                       ("WANDB__DISABLE_MACHINE_INFO", "true"), ("WANDB_ERROR_REPORTING", "false"),
                       ("WANDB_MODE", "offline")):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    assert not (home / "should_stay_empty").exists(), "wandb wrote outside the run dir"


@pytest.fixture
def make_tracker():
    trackers = []

    def _make(run_dir, run_id="abc12345", *, is_main=True, resume_step=None, max_steps=8, config=None, **cfg):
        cfg.setdefault("wandb_mode", "offline")
        cfg.setdefault("progress_bar", False)
        tracker = RunTracker(LoggingConfig(**cfg), run_dir=run_dir, run_id=run_id, config=config or {},
                             is_main=is_main, resume_step=resume_step, max_steps=max_steps)
        trackers.append(tracker)
        return tracker

    yield _make
    for tracker in trackers:  # a failed test must not leave a W&B run open for the next one
        tracker.finish(exit_code=1)


# ---------------------------------------------------------------- config and mode


@pytest.mark.parametrize("key, value", [
    ("wandb_mode", "cloud"), ("interval_steps", 0), ("interval_steps", True), ("image_interval_steps", -1),
    ("project", ""), ("project", "team/project"), ("entity", ""), ("tags", "one-string"), ("tags", ["x" * 65]),
    ("progress_bar", "yes"),
])
def test_logging_config_rejects(key, value):
    with pytest.raises(ValueError, match=rf"logging\.{key}=") as info:
        LoggingConfig(**{key: value})
    assert "allowed" in str(info.value)


def test_invalid_mode_error_names_allowed_values():
    with pytest.raises(ValueError, match=r"logging\.wandb_mode='cloud'.*'auto', 'online', 'offline', 'disabled'"):
        LoggingConfig(wandb_mode="cloud")


def test_auto_mode_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("auto", {"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_wandb_mode("auto", {"HOME": str(tmp_path), "WANDB_MODE": "disabled",
                                       "WANDB_API_KEY": "x" * 40}) == "disabled"
    assert resolve_wandb_mode("auto", {"HOME": str(tmp_path), "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online"}) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto", {"HOME": str(tmp_path)}) == "online"
    # a login for another host (a self-hosted server) does not count for api.wandb.ai, and vice versa
    assert resolve_wandb_mode("auto", {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.corp"}) == "offline"


def test_auto_mode_tracker_records_offline(tmp_path, monkeypatch, make_tracker):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tracker = make_tracker(tmp_path / "run", wandb_mode="auto")
    assert tracker.wandb_mode == "offline"
    assert tracker.wandb_run_dir.name.startswith("offline-run-")
    assert tracker.wandb_run_dir.parent == tmp_path / "run" / "wandb"


# ---------------------------------------------------------------- pure helpers


def test_redact_removes_secrets_in_nested_structures():
    config = {
        "wandb": {"api_key": PLANTED_SECRET, "project": "p"},
        "storage": {"aws_access_key_id": "AKIAABCDEFGHIJKLMNOP", "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET,
                    "aws_session_token": PLANTED_SECRET, "endpoint": "https://minio.local:9000"},
        "hub": {"hfToken": PLANTED_SECRET, "token": PLANTED_SECRET, "password": PLANTED_SECRET,
                "db_credentials": {"user": "u", "pass": PLANTED_SECRET}, "auth": PLANTED_SECRET},
        "shards": ["s3://user:" + PLANTED_SECRET + "@bucket/train-{000..009}.tar", "/data/local.tar"],
        "note": "uploaded with AKIAABCDEFGHIJKLMNOP and hf_" + "a" * 34,
        "empty_api_key": None,
        "copied": "Bearer " + PLANTED_SECRET,  # what an interpolation like ${wandb.api_key} leaves behind
    }
    out = redact(config)
    assert PLANTED_SECRET not in json.dumps(out) and "AKIAABCDEFGHIJKLMNOP" not in json.dumps(out)
    assert out["wandb"] == {"api_key": REDACTED, "project": "p"}
    assert out["storage"]["aws_access_key_id"] == REDACTED
    assert out["storage"]["endpoint"] == "https://minio.local:9000"
    assert out["hub"]["db_credentials"] == REDACTED
    assert out["shards"] == [f"s3://{REDACTED}@bucket/train-{{000..009}}.tar", "/data/local.tar"]
    assert out["note"] == f"uploaded with {REDACTED} and {REDACTED}"
    assert out["empty_api_key"] is None
    assert out["copied"] == f"Bearer {REDACTED}"
    assert config["wandb"]["api_key"] == PLANTED_SECRET  # the input is not modified


def test_redact_keeps_harmless_keys():
    harmless = {"keep_last": 3, "monkey": "banana", "key_column": "txt", "image_key": "jpg", "caption_key": "txt",
                "pad_token": "!", "eos_token_id": 49407, "num_tokens": 77, "max_token_length": 77,
                "tokenizer": "clip", "sort_key": "step", "author": "me", "git_commit": "a" * 40,
                "url": "https://example.com/path?x=1", "lr": 1e-4, "betas": [0.9, 0.999]}
    assert redact(harmless) == harmless
    assert not is_secret_key("monkey") and not is_secret_key("keep_last") and not is_secret_key("key_column")
    assert is_secret_key("apiKey") and is_secret_key("secret_key") and is_secret_key("key")


def test_new_run_id_format():
    ids = {new_run_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() for i in ids)


def test_console_line_format():
    scalars = {"zeta": 2, "step_time_s": 0.1512, "lr": 1e-4, "loss": 0.08311, "mem_gb": 1.234,
               "grad_norm": 0.4112, "samples_per_s": 212.34, "alpha": 0.123456}
    assert format_console_line(120, 3000, scalars) == (
        "step 120/3000 | loss 0.08311 | lr 1.00e-04 | grad_norm 0.411 | samples/s 212.3 | step_time 0.151s"
        " | mem 1.2GB | alpha=0.1235 | zeta=2")
    assert format_console_line(5, None, {"loss": 1.0}) == "step 5 | loss 1"
    aliases = {"samples/s": 212.34, "step_time": 0.1512, "nan_steps": 0}
    assert format_console_line(7, 9, aliases) == "step 7/9 | samples/s 212.3 | step_time 0.151s | nan_steps=0"


# ---------------------------------------------------------------- offline W&B end to end


def test_offline_run_records_scalars_images_and_no_secret(tmp_path, make_tracker):
    run_dir = tmp_path / "run"
    config = {"model": {"channels": 32}, "wandb": {"api_key": PLANTED_SECRET}, "optim": {"lr": 1e-4}}
    tracker = make_tracker(run_dir, "offl1234", config=config, interval_steps=10, max_steps=30,
                           tags=["test"], group="g")
    logged = {10: {"loss": 0.5, "lr": 1e-4}, 20: {"loss": 0.25, "lr": 9e-5}, 30: {"loss": 0.125, "lr": 8e-5}}
    for step, scalars in logged.items():
        tracker.log_scalars(step, {k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()})
    torch.manual_seed(0)
    samples = torch.rand(3, 3, 8, 8) * 2 - 1
    captions = ["a red cube", "a blue sphere", "two cats"]
    grid_path = tracker.log_images(30, "samples/ema", samples, captions)
    tracker.summary({"final_loss": 0.125})
    wandb_dir = tracker.wandb_run_dir
    tracker.finish()
    tracker.finish()  # idempotent

    # local files
    assert grid_path == run_dir / "samples" / "samples_ema_step0000030.png"
    np.testing.assert_array_equal(np.asarray(Image.open(grid_path)), make_grid(samples))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": s, **v} for s, v in logged.items()]
    assert json.loads((run_dir / "summary.json").read_text()) == {"final_loss": 0.125}

    # the W&B transaction log
    (wandb_file,) = offline_run_files(run_dir)
    assert wandb_file.parent == wandb_dir
    records = read_wandb_records(wandb_file)
    run = run_record(records)
    assert run.run_id == "offl1234" and run.project == "ldm-platform" and run.run_group == "g"
    assert list(run.tags) == ["test"]
    run_config = _nest(run.config.update)
    assert run_config["wandb"] == {"api_key": REDACTED}
    assert run_config["optim"] == {"lr": 1e-4}
    rows = history_by_step(records)
    assert sorted(rows) == [10, 20, 30]
    for step, scalars in logged.items():
        assert {k: rows[step][k] for k in scalars} == scalars
        assert rows[step]["_step"] == step
    images = rows[30]["samples/ema"]
    assert images["_type"] == "images/separated" and images["count"] == 3
    assert images["captions"] == captions
    assert (images["width"], images["height"]) == (8, 8)
    for filename, expected in zip(images["filenames"], to_uint8_list(samples)):
        np.testing.assert_array_equal(np.asarray(Image.open(wandb_dir / "files" / filename)), expected)

    # the planted secret is nowhere under the run dir (transaction log, config.yaml, debug logs)
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PLANTED_SECRET.encode() not in path.read_bytes(), path


def to_uint8_list(samples):
    from trainer.images import to_uint8

    return list(to_uint8(samples))


def test_resume_continues_run_id_and_truncates_metrics(tmp_path, make_tracker, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, "resu1234", interval_steps=2, max_steps=8)
    for step in range(1, 7):
        first.log_scalars(step, {"loss": 1.0 / step})
    first.finish(exit_code=1)  # preempted after step 6; the last checkpoint is step 4
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # torn write of a killed job

    caplog.clear()
    second = make_tracker(run_dir, "resu1234", resume_step=4, interval_steps=2, max_steps=8)
    assert any("resuming at step 4" in r.getMessage() and "keeps 4 records, dropped 2" in r.getMessage()
               for r in caplog.records)
    assert any("1 unreadable line" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    for step in range(5, 9):
        second.log_scalars(step, {"loss": 10.0 + step})
    second.finish()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + \
                      [{"step": s, "loss": 10.0 + s} for s in range(5, 9)]
    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert console == ["step 6/8 | loss 16", "step 8/8 | loss 18"]

    files = offline_run_files(run_dir)
    assert len(files) == 2
    runs = [run_record(read_wandb_records(f)) for f in files]
    assert [r.run_id for r in runs] == ["resu1234", "resu1234"]
    second_rows = history_by_step(read_wandb_records(files[1]))
    assert {s: row["loss"] for s, row in second_rows.items()} == {s: 10.0 + s for s in range(5, 9)}


def test_fresh_run_replaces_stale_metrics(tmp_path, make_tracker):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    tracker = make_tracker(run_dir, wandb_mode="disabled")
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.finish()
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_disabled_mode_writes_local_files_only(tmp_path, make_tracker):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, wandb_mode="disabled", max_steps=2)
    assert tracker.wandb_mode == "disabled" and tracker.wandb_run_dir is None
    tracker.log_scalars(2, {"loss": 0.5, "ok": True})
    tracker.log_images(2, "samples", torch.zeros(1, 3, 4, 4), ["c"])
    tracker.finish()
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == \
        ["metrics.jsonl", "samples", "samples/samples_step0000002.png"]
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {"step": 2, "loss": 0.5, "ok": 1}


def test_non_main_rank_writes_nothing(tmp_path, make_tracker):
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, is_main=False, wandb_mode="online", resume_step=3)
    assert tracker.wandb_mode == "disabled" and tracker.wandb_run_dir is None
    tracker.log_scalars(4, {"loss": 1.0})
    assert tracker.log_images(4, "samples", torch.zeros(2, 3, 4, 4), ["a", "b"]) is None
    tracker.summary({"fid": 1.0})
    tracker.finish()
    assert not run_dir.exists()


def test_progress_bar_only_on_a_tty(tmp_path, make_tracker, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    for progress_bar in (True, False):
        stderr = FakeTTY()
        monkeypatch.setattr(sys, "stderr", stderr)
        tracker = make_tracker(tmp_path / f"run{progress_bar}", wandb_mode="disabled", resume_step=1, max_steps=4,
                               progress_bar=progress_bar)
        for step in (2, 3, 4):
            tracker.log_scalars(step, {"loss": 0.5})
        tracker.finish()
        assert ("4/4" in stderr.getvalue() and "loss 0.5" in stderr.getvalue()) == progress_bar


def test_progress_line_moves_between_log_lines_with_an_eta(tmp_path, make_tracker, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    for stderr in (FakeTTY(), io.StringIO()):  # a terminal, then a pipe
        monkeypatch.setattr(sys, "stderr", stderr)
        tracker = make_tracker(tmp_path / f"run{stderr.isatty()}", wandb_mode="disabled", interval_steps=50,
                               max_steps=100, progress_bar=True)
        for step in range(1, 8):  # no log step yet: only the progress line may show anything
            tracker.advance(step)
        if tracker._bar is not None:
            tracker._bar.refresh()  # tqdm redraws at most every 0.1 s; the test runs faster
        shown = stderr.getvalue()
        tracker.finish()
        if stderr.isatty():
            assert "7/100" in shown and "<" in shown  # steps done and tqdm's [elapsed<remaining]
        else:
            assert shown == ""


def test_log_steps_and_bad_inputs(tmp_path, make_tracker):
    tracker = make_tracker(tmp_path / "run", wandb_mode="disabled", interval_steps=10, image_interval_steps=0,
                           max_steps=25)
    assert [s for s in range(1, 26) if tracker.is_log_step(s)] == [10, 20, 25]
    assert [s for s in range(1, 26) if tracker.is_image_step(s)] == [25]
    with pytest.raises(ValueError, match="captions"):
        tracker.log_images(1, "samples", torch.zeros(2, 3, 4, 4), ["only one"])
    with pytest.raises(ValueError, match="'step'"):
        tracker.log_scalars(1, {"step": 3})
    with pytest.raises(ValueError, match="scalar 'loss'"):
        tracker.log_scalars(1, {"loss": torch.zeros(2)})
    with pytest.raises(ValueError, match="run_id"):
        make_tracker(tmp_path / "x", "bad/id", wandb_mode="disabled")
    tracker.log_scalars(3, {"loss": math.inf})
    tracker.finish()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 3, "loss": math.inf}
