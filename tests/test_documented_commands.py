"""Every command in the README's code blocks and in the comments of conf/ parses as written.

Each command is split as a shell would (quotes, continuation lines, comments) and handed to its
command's own parser in a mode that does no work: Hydra commands are composed with the compose API
and validated (``OmegaConf.to_object``, what ``--cfg job`` plus the config checks do), eval.run and
data_pipeline.inspect through their argument parsers, ``make`` targets with ``make -n``. A documented
form that the override grammar, a key name or a config check refuses fails here (issue 19: the
README's ``data.urls`` examples did not parse).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import eval.reconstruction  # noqa: F401 - registers its config schema, as the command does
import trainer.export  # noqa: F401 - likewise
import trainer.plan  # noqa: F401
import trainer.sample  # noqa: F401
from data_pipeline import inspect as inspect_cmd
from eval.run import parse_args as eval_run_args
from eval.run import protocol_config
from trainer.submit import _argv_with_dry_run
from trainer.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CLI_DIR = str(Path(CONF_DIR) / "cli")

# Hydra commands: module -> (config folder, config name).
HYDRA_COMMANDS = {
    "trainer.train": (CONF_DIR, "train"),
    "trainer.submit": (CONF_DIR, "train"),
    "data_pipeline.precompute": (CONF_DIR, "train"),
    "trainer.plan": (CONF_DIR, "plan"),
    "trainer.sample": (CLI_DIR, "sample"),
    "trainer.export": (CLI_DIR, "export"),
    "eval.reconstruction": (CLI_DIR, "reconstruction"),
}
OTHER_COMMANDS = ("eval.run", "data_pipeline.inspect", "trainer.autoencoder_overrides")
MAKE_ARGS_COMMAND = {"plan": "trainer.plan", "run": "trainer.train", "run-pixel": "trainer.train"}


def _shell_lines(text: str) -> list[str]:
    """The commands of a shell snippet: continuation lines joined, comments and blank lines dropped."""
    text = text.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def readme_commands() -> list[tuple[str, str]]:
    """(where, command line) of every command in the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    out = []
    for i, block in enumerate(re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S)):
        out += [(f"README block {i}", line) for line in _shell_lines(block)]
    return out


def conf_commands() -> list[tuple[str, str]]:
    """(where, command line) of every ``python -m`` command in the comments of conf/*.yaml."""
    out = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        for line in _shell_lines("\n".join(comments)):
            # Only complete example commands: a usage synopsis with <placeholders> is not one.
            if line.startswith("python -m ") and "<" not in line and "..." not in line:
                out.append((str(path.relative_to(ROOT)), line))
    return out


def conf_override_examples() -> list[tuple[str, str]]:
    """(where, override) of every quoted ``'data.<key>=...'`` example in the comments of conf/*.yaml
    (an example may span comment lines)."""
    out = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        comments = " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines()
                            if line.lstrip().startswith("#"))
        out += [(str(path.relative_to(ROOT)), m) for m in re.findall(r"'(data\.[a-z_.]+=.*?)'(?:\s|$)", comments)]
    return out


COMMANDS = readme_commands() + conf_commands()
OVERRIDES = conf_override_examples()


def _words(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    # `[--dry-run]` marks an optional flag: check the command with it.
    return [w[1:-1] if re.fullmatch(r"\[--[\w-]+\]", w) else w for w in words]


def _module_and_args(words: list[str]) -> tuple[str, list[str]]:
    """(module, its arguments) of ``python -m M ...`` or ``torchrun <launcher options> -m M ...``."""
    if words[0] not in ("python", "python3", "torchrun") or "-m" not in words:
        raise AssertionError(f"not a python -m / torchrun -m / make command: {words}")
    i = words.index("-m")
    return words[i + 1], words[i + 2:]


def check_hydra(module: str, args: list[str]) -> None:
    conf_dir, name = HYDRA_COMMANDS[module]
    if module == "trainer.submit":
        args = _argv_with_dry_run(args)
    flags = [a for a in args if a.startswith("-")]
    assert not flags, f"{module} takes key=value overrides only, got {flags}"
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        cfg = compose(name, overrides=args)
        OmegaConf.to_object(cfg)  # every group's checks, as the command runs them before any work


def check_command(line: str) -> None:
    words = _words(line)
    if words[0] == "make":
        target = words[1]
        subprocess.run(["make", "-n", "-C", str(ROOT), target], check=True, capture_output=True, timeout=60)
        for w in words[2:]:
            key, _, value = w.partition("=")
            assert key in ("ARGS", "AE_ARGS"), f"make {target}: unknown variable {key}"
            if value:
                module = "trainer.train" if key == "AE_ARGS" else MAKE_ARGS_COMMAND[target]
                base = ["experiment=demo_autoencoder"] if key == "AE_ARGS" else []
                check_hydra(module, base + shlex.split(value))
        return
    module, args = _module_and_args(words)
    if module in HYDRA_COMMANDS:
        check_hydra(module, args)
    elif module == "eval.run":
        parsed = eval_run_args(args)
        if parsed.protocol:
            protocol_config({}, parsed)
    elif module == "data_pipeline.inspect":
        inspect_cmd.build_parser().parse_args(args)
    elif module == "trainer.autoencoder_overrides":
        assert len(args) == 1, f"trainer.autoencoder_overrides takes one path, got {args}"
    else:
        raise AssertionError(f"{module} is not a command of this project ({sorted(HYDRA_COMMANDS) + list(OTHER_COMMANDS)})")


def test_the_readme_documents_the_commands() -> None:
    modules = {_module_and_args(_words(line))[0] for _, line in COMMANDS if not line.startswith("make")}
    assert {"trainer.train", "trainer.sample", "trainer.export", "trainer.submit", "eval.run",
            "data_pipeline.inspect", "eval.reconstruction", "data_pipeline.precompute"} <= modules
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}: {line[:60]}" for w, line in COMMANDS])
def test_documented_command_parses(where: str, line: str) -> None:
    check_command(line)


def test_conf_comments_hold_override_examples() -> None:
    assert {o.split("=", 1)[0] for _, o in OVERRIDES} >= {"data.urls", "data.sources"}


@pytest.mark.parametrize("where,override", OVERRIDES, ids=[o[:60] for _, o in OVERRIDES])
def test_conf_comment_override_parses(where: str, override: str) -> None:
    check_hydra("trainer.train", ["experiment=ldm_1p45b_256", override])


@pytest.mark.parametrize("line", [
    # The README's forms before issue 19: Hydra's grammar refuses the braces inside [ ] or bare.
    "python -m trainer.train experiment=ldm_1p45b_256 data.urls='[s3://bucket/laion/{00000..12345}.tar]'",
    "python -m trainer.train experiment=autoencoder_kl_f8 data.urls='s3://bucket/laion/{00000..01023}.tar'",
    "python -m trainer.train train.max_step=10",  # a misspelt key
    "python -m trainer.train ... model.init_from=path/to/diffusers-folder",  # a placeholder
    "python -m eval.run checkpoint=runs/x watch=true poll_intervl_s=120",
    "python -m trainer.nothing x=1",
])
def test_a_broken_example_fails_the_check(line: str) -> None:
    with pytest.raises(Exception):
        check_command(line)


@pytest.mark.parametrize("override, urls", [
    ('data.urls="s3://bucket/laion/{00000..12345}.tar"', ["s3://bucket/laion/{00000..12345}.tar"]),
    ("data.urls='s3://bucket/laion/{00000..12345}.tar'", ["s3://bucket/laion/{00000..12345}.tar"]),
    ("data.urls=/data/a.tar", ["/data/a.tar"]),
    ('data.urls=["s3://a/{0..9}.tar",/data/b/*.tar,/data/c/shards.txt]', ["s3://a/{0..9}.tar", "/data/b/*.tar",
                                                                          "/data/c/shards.txt"]),
])
def test_data_urls_take_one_pattern_or_a_list(override: str, urls: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("train", overrides=["experiment=ldm_1p45b_256", override]))
    assert cfg.data.urls == urls


def test_data_urls_refuse_what_is_not_a_pattern() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        for bad in ("data.urls=5", "data.urls=[a.tar,'']"):
            with pytest.raises(ValueError, match=r"data.urls=.* is invalid; allowed: a shard URL pattern"):
                OmegaConf.to_object(compose("train", overrides=["experiment=ldm_1p45b_256", bad]))
