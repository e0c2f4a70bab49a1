"""Run tracking on the main rank: W&B (online / offline / disabled), metrics.jsonl, console lines, sample grids.

Everything a run writes lives under its run directory:

    <run_dir>/metrics.jsonl                      one JSON object per `log_scalars` call: {"step": s, **scalars}
    <run_dir>/summary.json                       the final values given to `summary`
    <run_dir>/samples/<key>_step<step:07d>.png   sample grids from `log_images`
    <run_dir>/wandb/offline-run-<time>-<id>/     W&B's own files (`wandb sync` uploads an offline one later)

The scalar names the console line knows (`CONSOLE_FIELDS`) are loss, lr, grad_norm, samples_per_s,
tflops_per_device, mfu,
step_time_s and mem_gb; any other key is appended as `key=value`. With `logging.progress_bar` and a TTY
on stderr, the tracker also draws the tqdm bar, advanced by `log_scalars`.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from trainer.checks import check_int, invalid
from trainer.images import atomic_write_bytes, save_png, tile_uint8, to_uint8

logger = logging.getLogger("trainer")

WANDB_MODES = ("auto", "online", "offline", "disabled")
REDACTED = "***REDACTED***"

# W&B rejects these characters in project names and run ids (wandb/sdk/wandb_settings.py validators).
_WANDB_FORBIDDEN_CHARS = set("/\\#?%:")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# W&B's server limit on tag length.
_MAX_TAG_LEN = 64


@dataclass
class LoggingConfig:
    """Hydra structured config group `logging`."""

    interval_steps: int = 10          # console line every N steps; the loop logs scalars on these steps
    image_interval_steps: int = 0     # sample grids every N steps; 0 = only at the end of training
    # auto: WANDB_MODE if set, else online when an API key is available (WANDB_API_KEY, or a
    # ~/.netrc entry for the W&B host), else offline.
    wandb_mode: str = "auto"
    project: str = "ldm-platform"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True         # tqdm on the main rank when stderr is a TTY

    def __post_init__(self) -> None:
        check_int("logging.interval_steps", self.interval_steps, 1)
        if isinstance(self.image_interval_steps, bool) or not isinstance(self.image_interval_steps, int) \
                or self.image_interval_steps < 0:
            raise invalid("logging.image_interval_steps", self.image_interval_steps, "an int >= 0 (0 = only at the end)")
        if self.wandb_mode not in WANDB_MODES:
            raise invalid("logging.wandb_mode", self.wandb_mode, f"one of {WANDB_MODES}")
        if not isinstance(self.project, str) or not self.project or len(self.project) > 128 \
                or _WANDB_FORBIDDEN_CHARS & set(self.project):
            raise invalid("logging.project", self.project, "a non-empty string of at most 128 characters without any of / \\ # ? % :")
        for key in ("entity", "run_name", "group"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise invalid(f"logging.{key}", value, "None or a non-empty string")
        if isinstance(self.tags, (str, bytes)) or not isinstance(self.tags, Sequence) \
                or not all(isinstance(t, str) and 0 < len(t) <= _MAX_TAG_LEN for t in self.tags):
            raise invalid("logging.tags", self.tags, f"a list of non-empty strings of at most {_MAX_TAG_LEN} characters")
        if not isinstance(self.progress_bar, bool):
            raise invalid("logging.progress_bar", self.progress_bar, "true or false")


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] | None = None) -> str:
    """Resolve `logging.wandb_mode` to online / offline / disabled.

    An explicit mode wins over the environment. `auto` follows WANDB_MODE when set (W&B's own switch,
    e.g. WANDB_MODE=disabled in CI), then goes online only when an API key is available, so a job on
    a node without credentials records offline instead of failing at `wandb.init`.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb_mode={mode!r} is invalid; allowed: one of {WANDB_MODES}")
    if mode != "auto":
        return mode
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    # "run" and "dryrun" are W&B's legacy spellings of online and offline.
    env_modes = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                 "disabled": "disabled"}
    if env_mode in env_modes:
        return env_modes[env_mode]
    if env_mode:
        logger.warning("WANDB_MODE=%r is not one of %s; ignored by logging.wandb_mode=auto",
                       env_mode, sorted(env_modes))
    if environ.get("WANDB_API_KEY"):
        return "online"
    return "online" if _netrc_has_wandb_login(environ) else "offline"


def _netrc_has_wandb_login(environ: Mapping[str, str]) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(environ.get("NETRC") or Path(environ.get("HOME") or Path.home()) / ".netrc")
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError) as e:
        logger.warning("could not read %s (%s); assuming no W&B login there", path, type(e).__name__)
        return False


# Redaction rule. A key's name is split into lower-case words at `_`, `-`, `.`, spaces and camelCase
# boundaries ("awsSecretAccessKey" -> aws, secret, access, key). Its value is redacted when
#   1. any word is in _SECRET_WORDS (secret, password, credential(s), auth, ...), or
#   2. the last word is "key" or "token" (api_key, hf_token, session_token, key, token) unless the
#      word before it names data rather than a credential (_HARMLESS_BEFORE: image_key, caption_key,
#      sort_key, pad_token, eos_token, max_token ...), or
#   3. the name ends in access_key_id (aws_access_key_id).
# So keep_last, monkey, key_column, token_ids, num_tokens and tokenizer are kept. A None or empty value
# is kept as is (it reveals nothing and shows that no credential was configured). Independently of
# keys, string values anywhere are scrubbed (``redact_text``) of AWS access key ids (AKIA/ASIA + 16),
# Hugging Face tokens (hf_...), the user info of URLs whatever characters it holds
# (s3://user:pa/ss+w=rd@host -> s3://***REDACTED***@host), the credential parameters of pre-signed
# URLs (X-Amz-Signature=..., Signature=..., sig=...), the values of secret-named environment variables
# (AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, ...) and copies of the values found under secret keys.
_SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "passphrase", "credential",
                           "credentials", "apikey", "auth", "authorization"})
_HARMLESS_BEFORE = {
    "key": frozenset({"image", "caption", "text", "label", "class", "sort", "cache", "state", "dict",
                      "column", "metric", "monitor", "sample", "input", "output", "target", "primary",
                      "lookup", "hash", "shard"}),
    "token": frozenset({"pad", "bos", "eos", "unk", "mask", "sep", "cls", "sot", "eot", "start", "end",
                        "special", "max", "num"}),
}
# Shorter values under secret keys (a flag, a port) are too likely to occur by chance elsewhere.
_MIN_ECHO_LEN = 8
# Query parameters that carry a credential in pre-signed / SAS URLs (AWS SigV2 and V4, GCS, Azure).
_CREDENTIAL_PARAMS = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
                      "X-Goog-Credential", "Signature", "AWSAccessKeyId", "x-amz-security-token", "sig",
                      "access_token", "token", "api_key", "apikey", "key", "secret", "password")
_SECRET_VALUE_PATTERNS = (
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), REDACTED),
    # user:password@ up to the last @ of the word: an AWS secret may hold / + = and even @.
    (re.compile(r"(?<=://)[^\s'\"<>]*?:[^\s'\"<>]*@"), REDACTED + "@"),
    (re.compile(r"(?<=://)[^\s'\"<>/:@?#]+@"), REDACTED + "@"),  # a bare token as user info
    (re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in _CREDENTIAL_PARAMS) + r")=)[^&\s'\"<>#]*"),
     r"\1" + REDACTED),
)


def _key_words(name: str) -> list[str]:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def _environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables (AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, ...), longest first."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if is_secret_key(k) and len(v) >= _MIN_ECHO_LEN}, key=len, reverse=True)


def redact_text(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without credentials (the value patterns above, the values of secret-named environment
    variables and ``secrets``): the one scrub every writer of the run applies."""
    for secret in sorted({*secrets, *_environment_secrets()}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that formats each record's message once and scrubs it with ``redact_text``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def is_secret_key(name: str) -> bool:
    """Whether a config key names a credential (the rule above)."""
    words = _key_words(name)
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    if words[-1] in _HARMLESS_BEFORE:
        return len(words) == 1 or words[-2] not in _HARMLESS_BEFORE[words[-1]]
    return words[-3:] == ["access", "key", "id"]


def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes)))


def _values(value: Any):
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _values(v)
    elif _is_container(value):
        for v in value:
            yield from _values(v)
    else:
        yield value


def redact(config: Mapping) -> dict:
    """A nested copy of `config` with credentials replaced by REDACTED (rule above); the input is untouched.

    A secret's value is also scrubbed where it reappears under a harmless key (e.g. copied there by an
    OmegaConf interpolation), when it is at least _MIN_ECHO_LEN characters long.
    """
    secret_values: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(k, str) and is_secret_key(k):
                    secret_values.update(str(s) for s in _values(v) if s is not None and len(str(s)) >= _MIN_ECHO_LEN)
                else:
                    collect(v)
        elif _is_container(value):
            for v in value:
                collect(v)

    def scrub(value: str) -> str:
        return redact_text(value, tuple(secret_values))

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else walk(v))
                    for k, v in value.items()}
        if _is_container(value):
            return [walk(v) for v in value]
        if isinstance(value, str):
            return scrub(value)
        return value

    collect(config)
    return walk(config)


def redact_argv(argv: Sequence[str], config: Mapping) -> list[str]:
    """A command line without credentials: ``key=value`` overrides of secret-named keys lose their
    value, and every argument is scrubbed with ``redact_text`` and the secret values of ``config``."""
    values = {str(s) for k, v in _secret_items(config) for s in _values(v) if s is not None and len(str(s)) >= _MIN_ECHO_LEN}
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value and any(is_secret_key(part) for part in key.lstrip("+~").split(".")):
            arg = f"{key}={REDACTED}"
        out.append(redact_text(arg, tuple(values)))
    return out


def _secret_items(value: Any):
    """(key, value) of every secret-named key in a nested config."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and is_secret_key(k):
                yield k, v
            else:
                yield from _secret_items(v)
    elif _is_container(value):
        for v in value:
            yield from _secret_items(v)


def new_run_id() -> str:
    """8 random lower-case alphanumeric characters, the form of W&B's generated run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# (scalar keys, console label, format), in console order. The second spellings are accepted for
# loops that log them; prefer the first: W&B reads "/" as a panel section, so "samples/s" would
# appear as a metric "s" in a section "samples".
CONSOLE_FIELDS = (
    (("loss",), "loss", "{:.4g}"),
    (("lr",), "lr", "{:.2e}"),
    (("grad_norm",), "grad_norm", "{:.3g}"),
    (("samples_per_s", "samples/s"), "samples/s", "{:.1f}"),
    (("tflops_per_device",), "TFLOP/s/device", "{:.3g}"),
    (("mfu",), "MFU", "{:.1%}"),
    (("step_time_s", "step_time"), "step_time", "{:.3f}s"),
    (("mem_gb",), "mem", "{:.1f}GB"),
)
_CONSOLE_KEYS = frozenset(key for keys, _, _ in CONSOLE_FIELDS for key in keys)


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def format_console_line(step: int, max_steps: int | None, scalars: Mapping[str, float]) -> str:
    """`step 120/3000 | loss 0.0831 | lr 1.00e-04 | ... | mem 1.2GB | other=1.5`: known keys in
    CONSOLE_FIELDS order, then the remaining keys sorted by name."""
    parts = [f"step {step}/{max_steps}" if max_steps is not None else f"step {step}"]
    for keys, label, fmt in CONSOLE_FIELDS:
        for key in keys:
            if key in scalars:
                value = scalars[key]
                is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
                parts.append(f"{label} {fmt.format(value) if is_number else value}")
                break
    parts.extend(f"{key}={_format_value(scalars[key])}" for key in sorted(scalars) if key not in _CONSOLE_KEYS)
    return " | ".join(parts)


def _to_scalar(key: str, value: Any) -> int | float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"scalar {key!r} has shape {tuple(value.shape)}; allowed: one element")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scalar {key!r}={value!r} is invalid; allowed: a number or a one-element tensor") from None


def _sanitize_filename(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "images"


class RunTracker:
    """Tracking for one training run. Only the main rank records anything; on other ranks every method
    is a no-op, so the loop calls them unconditionally.

    W&B runs with `id=run_id, resume="allow"`, so a restarted job with the same run id continues the same
    W&B run (offline: a new offline-run-* directory whose records carry the same id, so `wandb sync`
    uploads both to that run). W&B keeps steps monotonic: after resuming from step k of an online run that had
    already logged beyond k, W&B drops the replayed steps up to its last one, while metrics.jsonl is
    truncated to k and rewritten in full.
    """

    def __init__(self, cfg: LoggingConfig, *, run_dir: str | Path, run_id: str, config: Mapping, is_main: bool,
                 resume_step: int | None = None, max_steps: int | None = None) -> None:
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id={run_id!r} is invalid; allowed: 1-64 characters from [A-Za-z0-9_-]")
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                        or resume_step < 0):
            raise ValueError(f"resume_step={resume_step!r} is invalid; allowed: None or an int >= 0")
        self._cfg = cfg
        self._run_id = run_id
        self._run_dir = Path(run_dir)
        self._is_main = is_main
        self._max_steps = max_steps
        self._wandb_run = None
        self._metrics_file = None
        self._bar = None
        self._summary: dict[str, Any] = {}
        self._finished = False
        self._wandb_mode = resolve_wandb_mode(cfg.wandb_mode) if is_main else "disabled"
        if not is_main:
            return

        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_path = self._run_dir / "metrics.jsonl"
        self._summary_path = self._run_dir / "summary.json"
        kept, dropped = self._truncate_metrics(resume_step)
        if resume_step is not None and self._summary_path.is_file():
            self._summary = json.loads(self._summary_path.read_text())
        self._metrics_file = open(self._metrics_path, "a", encoding="utf-8")
        if self._wandb_mode != "disabled":
            try:
                self._wandb_run = self._init_wandb(config)
            except BaseException:
                self._metrics_file.close()
                raise

        where = f" ({self.wandb_run_dir})" if self._wandb_run is not None else ""
        logger.info("run %s: W&B %s%s, run dir %s", run_id, self._wandb_mode, where, self._run_dir)
        if resume_step is not None:
            logger.info("run %s: resuming at step %d; metrics.jsonl keeps %d records, dropped %d after step %d",
                        run_id, resume_step, kept, dropped, resume_step)
        if cfg.progress_bar and max_steps is not None and sys.stderr.isatty():
            self._bar = tqdm(total=max_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def _truncate_metrics(self, resume_step: int | None) -> tuple[int, int]:
        """Keep only records with step <= resume_step (none for a fresh run), so the file reads as one
        uninterrupted run; steps logged after the checkpoint will be logged again."""
        if not self._metrics_path.is_file():
            return 0, 0
        kept_lines, num_dropped, num_unreadable = [], 0, 0
        for line in self._metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
                if isinstance(step, bool) or not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, KeyError, TypeError):
                # A job killed mid-write leaves a torn last line.
                num_unreadable += 1
                continue
            if resume_step is not None and step <= resume_step:
                kept_lines.append(line)
            else:
                num_dropped += 1
        if num_unreadable:
            logger.warning("%s: dropped %d unreadable line(s)", self._metrics_path, num_unreadable)
        if resume_step is None and num_dropped:
            logger.warning("%s: a fresh run (no resume step) replaces %d existing record(s)",
                           self._metrics_path, num_dropped)
        text = "".join(line + "\n" for line in kept_lines)
        atomic_write_bytes(self._metrics_path, text.encode("utf-8"))
        return len(kept_lines), num_dropped

    def _init_wandb(self, config: Mapping):
        # Imported here: importing wandb takes ~0.5 s and starts nothing; non-main ranks and
        # disabled runs never need it.
        import wandb

        if self._wandb_mode == "offline":
            # With no network, wandb-core's error reporting can only fail; setdefault keeps a user's choice.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        cfg = self._cfg
        # W&B records the command line (sys.argv) in its run file and metadata, which `wandb sync`
        # uploads; Hydra has parsed it already, so the process keeps only a redacted copy.
        sys.argv[:] = redact_argv(sys.argv, config)
        # dir= is W&B's root_dir: runs go to <run_dir>/wandb/<offline-run|run>-<time>-<id>/, and it
        # overrides WANDB_DIR. finish_previous: a run left open in this process (an earlier tracker that
        # was never finished) is closed instead of being silently returned under another id.
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name, group=cfg.group,
            tags=list(cfg.tags) or None, id=self._run_id, resume="allow", dir=str(self._run_dir),
            mode=self._wandb_mode, config=redact(config), reinit="finish_previous",
        )

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def wandb_mode(self) -> str:
        """The resolved mode: online, offline or disabled (always disabled on non-main ranks)."""
        return self._wandb_mode

    @property
    def wandb_run_dir(self) -> Path | None:
        """W&B's directory for this run (holds run-<id>.wandb and files/), or None without W&B."""
        return None if self._wandb_run is None else Path(self._wandb_run.settings.sync_dir)

    def is_log_step(self, step: int) -> bool:
        """Whether the loop should gather and log scalars at `step` (every interval_steps and the last)."""
        return step % self._cfg.interval_steps == 0 or step == self._max_steps

    def is_image_step(self, step: int) -> bool:
        """Whether the loop should sample a grid at `step` (every image_interval_steps, and the last step)."""
        every = self._cfg.image_interval_steps
        return (every > 0 and step % every == 0) or step == self._max_steps

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Append {"step": step, **scalars} to metrics.jsonl, log to W&B at `step`, and print a console
        line on log steps. Tensors are read with .item(), a host sync: call this on log steps only."""
        if not self._is_main or self._finished:
            return
        if "step" in scalars:
            raise ValueError("scalars contain the key 'step'; allowed: any other name (step is the argument)")
        values = {key: _to_scalar(key, value) for key, value in scalars.items()}
        self._metrics_file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._metrics_file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        if self.is_log_step(step):
            if self._bar is not None:
                self._bar.clear()  # so the log line does not land on the bar's line
            logger.info(format_console_line(step, self._max_steps, values))
        if self._bar is not None:
            if "loss" in values:
                self._bar.set_postfix_str(f"loss {values['loss']:.4g}", refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def advance(self, step: int) -> None:
        """Every optimizer step: the live progress line (steps, rate, ETA) moves on between the log
        lines, when stderr is a terminal. Reads no tensor, so it costs the step no host sync."""
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))

    def log_images(self, step: int, key: str, images: torch.Tensor, captions: Sequence[str], *,
                   value_range: Sequence[float] = (-1.0, 1.0)) -> Path | None:
        """Save the batch (N, C, H, W) as one grid <run_dir>/samples/<key>_step<step:07d>.png and log it to
        W&B as a list of N images under `key`, each with its caption (W&B's gallery with a step slider).
        Returns the grid's path (None on non-main ranks)."""
        if not self._is_main or self._finished:
            return None
        batch = to_uint8(images, value_range)  # (N, H, W, 3)
        if len(captions) != len(batch):
            raise ValueError(f"len(captions)={len(captions)} does not match the {len(batch)} images; "
                             f"allowed: one caption per image")
        path = save_png(tile_uint8(batch), self._run_dir / "samples" / f"{_sanitize_filename(key)}_step{step:07d}.png")
        if self._wandb_run is not None:
            # Imported here: wandb takes ~0.5 s to import; non-main ranks and disabled runs never need it.
            import wandb

            self._wandb_run.log({key: [wandb.Image(image, caption=str(caption))
                                       for image, caption in zip(batch, captions)]}, step=int(step))
        return path

    def summary(self, values: Mapping[str, Any]) -> None:
        """Record final values: W&B run summary and <run_dir>/summary.json (merged with earlier calls)."""
        if not self._is_main or self._finished:
            return
        values = {key: _to_scalar(key, value) if isinstance(value, (torch.Tensor, int, float)) else value
                  for key, value in values.items()}
        values = redact(values)
        self._summary.update(values)
        atomic_write_bytes(self._summary_path, (json.dumps(self._summary, indent=2, sort_keys=True) + "\n").encode())
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the files and the W&B run (exit_code != 0 marks it failed). Safe to call more than once."""
        if self._finished:
            return
        self._finished = True
        if self._bar is not None:
            self._bar.close()
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
