"""No secret reaches a file (issue 19, item 3): one redaction (``redact_text``) for every writer, URL
user info whatever it holds, pre-signed query credentials, secret-named environment variables; the
W&B run file never holds the raw command line; credentials in ``data.s3.endpoint_url`` and in a SLURM
script are refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import train_helpers as th
from data_pipeline.sources import S3Options
from trainer.runtime.tracking import REDACTED, RedactingFilter, redact, redact_text
from trainer.submit import refuse_secrets

# An AWS-style secret: / + = and even @ inside.
SECRET = "wJalr/XUtn+FEMI=K7MD@ENG"
PARTS = ("wJalr", "XUtn", "FEMI", "K7MD")  # no piece of it may survive either
SIGNATURE = "5f2c9d7e8a1b4c3d2e1f0a9b8c7d6e5f"
CREDENTIAL = "ASIAEXAMPLEKEY%2F20260101%2Fus-east-1"
ENV_SECRET = "envSecretValue/+=42xyz"


def _leaks(text: str) -> list[str]:
    return [s for s in (SECRET, *PARTS, SIGNATURE, CREDENTIAL, ENV_SECRET, "envSecretValue") if s in text]


@pytest.mark.parametrize("text", [
    f"s3://AKID:{SECRET}@store.example.com/bucket/x.tar",
    f"https://user:{SECRET}@host:9000/p",
    f"https://b.s3.amazonaws.com/x.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={SIGNATURE}",
    f"https://b.s3.amazonaws.com/x.tar?AWSAccessKeyId=AKID&Signature={SIGNATURE}&Expires=1",
    f"failed reading 'https://h/x?sig={SIGNATURE}' after 3 tries",
])
def test_redact_text_removes_every_form(text: str) -> None:
    out = redact_text(text)
    assert not _leaks(out), out
    assert REDACTED in out


def test_harmless_urls_are_kept() -> None:
    for url in ("s3://bucket/path@v2/x.tar", "http://127.0.0.1:9000/bucket", "https://h/x.tar?partNumber=2"):
        assert redact_text(url) == url


def test_environment_secrets_and_config_values(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    assert redact_text(f"echoed {ENV_SECRET} here") == f"echoed {REDACTED} here"
    out = redact({"data": {"urls": [f"s3://k:{SECRET}@h/b/{{0..9}}.tar"], "storage_options": {"secret": SECRET}},
                  "note": f"copy of {SECRET}"})
    assert not _leaks(repr(out)), out


def test_log_records_are_scrubbed(monkeypatch) -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "shard %s unreadable", (f"s3://a:{SECRET}@h/b",), None)
    assert RedactingFilter().filter(record)
    assert not _leaks(record.getMessage()) and REDACTED in record.getMessage()


def test_credentials_in_the_endpoint_are_refused() -> None:
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as err:
        S3Options(endpoint_url=f"https://AKID:{SECRET}@store.example.com")
    assert not _leaks(str(err.value))
    S3Options(endpoint_url="http://127.0.0.1:9000")


def test_a_slurm_script_never_holds_a_secret() -> None:
    for override in (f"data.storage_options.secret={SECRET}", f"data.urls=['s3://a:{SECRET}@h/b.tar']",
                     f"model.init_from=https://h/m.ckpt?X-Amz-Signature={SIGNATURE}"):
        with pytest.raises(ValueError, match="environment") as err:
            refuse_secrets([override])
        assert not _leaks(str(err.value))
    refuse_secrets(["experiment=tiny", "data.caption_key=txt", "checkpoint.keep_last=2"])


@pytest.mark.slow
def test_a_run_with_planted_credentials_writes_none_of_them(tmp_path: Path, monkeypatch) -> None:
    """Secrets in every place a user could put them; afterwards no byte under the run directory (its
    W&B folder, binary run file included) holds any of them."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    overrides = [
        f"+data.storage_options.secret='{SECRET}'",
        f"data.urls=['s3://AKID:{SECRET}@store.example.com/b/x.tar',"
        f"'https://b.s3.amazonaws.com/x.tar?X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={SIGNATURE}']",
        "train.max_steps=1", "checkpoint.interval_steps=1",
    ]
    th.run(run_dir, overrides, expect=0)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "no W&B run file written"
    for path in files:
        data = path.read_bytes()
        leaked = [s for s in (SECRET, *PARTS, SIGNATURE, CREDENTIAL, ENV_SECRET) if s.encode() in data]
        assert not leaked, f"{path.relative_to(run_dir)} holds {leaked}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == ENV_SECRET


def test_the_command_line_given_to_wandb_is_redacted() -> None:
    from trainer.runtime.tracking import redact_argv

    config = {"data": {"storage_options": {"secret": SECRET}, "note": "x"}}
    argv = ["trainer/train.py", f"+data.storage_options.secret='{SECRET}'", f"data.note={SECRET}x",
            f"data.urls=['s3://k:{SECRET}@h/b.tar']", "train.max_steps=1"]
    out = redact_argv(argv, config)
    assert not _leaks(" ".join(out)), out
    assert out[0] == "trainer/train.py" and out[-1] == "train.max_steps=1"
