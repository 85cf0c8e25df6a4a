"""Operator conventions (issue 12), the parts that need no daemon: routes and next flushes (pure),
the config lookup order, journald priorities, --help naming every default, retention of
directories, the daemon's pid from the kernel's lock table, and what the package ships.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import orjson
import pytest

from batchd import ops, retention, settings
from batchd.cli import build_parser
from batchd.deadlines import FlushPlan, FlushReason
from batchd.service import SERVICE_FILES, service_files, write_service_files
from batchd.store.contract import PAUSE_UNTIL

from .conftest import require_root
from .harness import as_user, python_for

OTHER_UID = 61234  # numeric: needs no /etc/passwd entry

REPO = Path(__file__).resolve().parent.parent

# -- routes and next flushes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "route"),
    [
        (None, ("*", "*")),
        ("", ("*", "*")),
        ("*", ("*", "*")),
        ("openai", ("openai", "*")),
        ("openai/gpt-4o-mini", ("openai", "gpt-4o-mini")),
        ("local/meta-llama/Llama-3", ("local", "meta-llama/Llama-3")),
    ],
)
def test_a_route_is_a_profile_and_maybe_a_model(text: str | None, route: tuple[str, str]) -> None:
    assert ops.parse_route(text) == route
    assert ops.parse_route(ops.route_name(*route)) == route


@pytest.mark.parametrize("text", ["/gpt-4o", "openai/"])
def test_a_route_with_an_empty_part_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a route"):
        ops.parse_route(text)


def test_held_until_matches_exact_holds_and_wildcard_pauses_and_takes_the_longest() -> None:
    holds = {("openai", "m"): 100.0, ("anthropic", "*"): PAUSE_UNTIL}
    assert ops.held_until(holds, "openai", "m") == 100.0
    assert ops.held_until(holds, "openai", "other") is None
    assert ops.held_until(holds, "anthropic", "claude") == PAUSE_UNTIL
    assert ops.held_until({**holds, ("*", "*"): PAUSE_UNTIL}, "openai", "m") == PAUSE_UNTIL
    assert ops.held_until({("*", "m"): 50.0, ("openai", "m"): 40.0}, "openai", "m") == 50.0


def test_a_pause_has_no_flush_time_and_a_due_flush_is_now() -> None:
    now = 1010.0
    assert ops.shown_flush(FlushPlan(PAUSE_UNTIL, FlushReason.HELD), now) == ops.NextFlush(None, "paused")
    assert ops.shown_flush(FlushPlan(2000.0, FlushReason.HELD), now) == ops.NextFlush(2000.0, "held")
    assert ops.shown_flush(FlushPlan(900.0, FlushReason.AGE), now) == ops.NextFlush(now, "age")
    assert ops.shown_flush(FlushPlan(1600.0, FlushReason.AGE), now) == ops.NextFlush(1600.0, "age")


def test_a_due_flush_of_a_profile_at_max_in_flight_waits_for_one_of_its_batches() -> None:
    now = 1010.0
    assert ops.shown_flush(FlushPlan(now, FlushReason.FULL), now, True) == ops.NextFlush(None, "in_flight")
    # Not yet due: its time still stands (the limit may have eased by then).
    assert ops.shown_flush(FlushPlan(1600.0, FlushReason.AGE), now, True) == ops.NextFlush(1600.0, "age")


# -- the config lookup order ----------------------------------------------------------------------


def test_the_config_is_found_at_the_flag_then_the_variable_then_etc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc-batchd.toml"
    monkeypatch.setattr(settings, "DEFAULT_CONFIG", system)
    env = {"BATCHD_CONFIG": str(tmp_path / "env.toml")}
    assert settings.config_path("flag.toml", env) == Path("flag.toml")
    assert settings.config_path(None, env) == tmp_path / "env.toml"
    assert settings.config_path(None, {}) is None  # no system file: the built-in defaults
    system.write_text('[daemon]\nspool_dir = "/srv/spool"\n')
    assert settings.config_path(None, {}) == system
    assert settings.config_path(None, env) == tmp_path / "env.toml"
    monkeypatch.delenv("BATCHD_CONFIG", raising=False)
    assert settings.load_settings().daemon.spool_dir == Path("/srv/spool")


def test_an_unreadable_system_config_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_root()
    (tmp_path / "etc").mkdir(mode=0o700)
    system = tmp_path / "etc" / "batchd.toml"
    system.write_text("[daemon]\n")
    tmp_path.chmod(0o755)
    monkeypatch.setattr(settings, "DEFAULT_CONFIG", system)
    program = (
        "import sys; from batchd import settings as s; from pathlib import Path; "
        f"s.DEFAULT_CONFIG = Path({str(system)!r}); sys.exit(__import__('batchd.cli').cli.main(['status']))"
    )
    python, env = python_for(OTHER_UID)
    env = {**{k: v for k, v in os.environ.items() if k != "BATCHD_CONFIG"}, **env}
    proc = subprocess.run(
        [*python, "-c", program], capture_output=True, text=True, timeout=60, env=env, **as_user(OTHER_UID)
    )
    assert proc.returncode == 78 and str(system) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- journald priorities --------------------------------------------------------------------------

LOG_PROGRAM = """
from batchd.logs import configure_logging, get_logger
configure_logging("json", "debug")
log = get_logger("t")
log.debug("t.debug"); log.info("t.info"); log.warning("t.warning", n=1); log.error("t.error")
"""


def _log_lines(stdout: int, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", LOG_PROGRAM], stdout=stdout, env=env, check=True, timeout=60)


def test_on_the_journal_each_line_carries_its_priority(tmp_path: Path) -> None:
    journal, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        info = os.fstat(ours.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        _log_lines(ours.fileno(), env)
        ours.close()
        received = b""
        while chunk := journal.recv(65536):
            received += chunk
    finally:
        journal.close()
    lines = received.decode().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert [orjson.loads(line[3:])["event"] for line in lines] == ["t.debug", "t.info", "t.warning", "t.error"]


@pytest.mark.parametrize("journal_stream", [None, "1:2"], ids=["no-journal", "another-stream"])
def test_elsewhere_lines_stay_plain_json(tmp_path: Path, journal_stream: str | None) -> None:
    env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    if journal_stream:
        env["JOURNAL_STREAM"] = journal_stream  # set, but not our stdout (a child of a unit, a redirect)
    out = tmp_path / "out.log"
    with out.open("wb") as handle:
        _log_lines(handle.fileno(), env)
    events = [orjson.loads(line)["event"] for line in out.read_text().splitlines()]
    assert events == ["t.debug", "t.info", "t.warning", "t.error"]


# -- --help ---------------------------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_and_option_says_what_it_does_and_its_default() -> None:
    commands = _commands()
    for name in ("batches", "pause", "resume", "init-service", "status", "report", "results"):
        assert name in commands
    for name, command in commands.items():
        assert command.description, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or (not action.option_strings and action.nargs != "?"):
                continue
            assert action.help and len(action.help) > 12, (name, action.dest)
            if action.required:  # a required option has no default to name
                assert "(required)" in action.help and "default" not in action.help, (name, action.dest)
            else:
                assert "default" in action.help, (name, action.dest, action.help)
        text = command.format_help()
        # demo runs on its own temporary config: a --config there would be ignored, so it has none.
        assert "$BATCHD_CONFIG" in text or name in ("emulator", "init-service", "demo"), name
    assert not [a for a in commands["demo"]._actions if "--config" in a.option_strings]


# -- retention of directories -------------------------------------------------------------------------


def test_prune_directory_removes_old_files_and_links_but_never_a_part_or_a_directory(tmp_path: Path) -> None:
    old = time.time() - 100
    for name in ("a.results.jsonl", "b.results.jsonl.part", "c.jsonl"):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old, old))
    os.symlink("/nonexistent", tmp_path / "link.jsonl")
    os.utime(tmp_path / "link.jsonl", (old, old), follow_symlinks=False)
    (tmp_path / "fresh.jsonl").write_text("x")
    (tmp_path / "sub").mkdir()
    os.utime(tmp_path / "sub", (old, old))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        removed = retention.prune_directory(fd, time.time() - 50, retention.still_growing)
    finally:
        os.close(fd)
    assert sorted(removed) == ["a.results.jsonl", "c.jsonl", "link.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.results.jsonl.part", "fresh.jsonl", "sub"]


def test_an_age_of_zero_keeps_forever() -> None:
    assert retention.cutoff(0, 1000.0) is None
    assert retention.cutoff(60, 1000.0) == 940.0
    assert retention.rows_interval(1) == 1.0 and retention.rows_interval(90 * 86400) == 3600.0


# -- the daemon's pid ---------------------------------------------------------------------------------


def test_the_daemon_pid_is_the_lock_holder_and_a_stale_lock_file_is_no_daemon(tmp_path: Path) -> None:
    assert ops.daemon_pid(tmp_path) is None  # no lock file at all
    path = tmp_path / ops.LOCK_NAME
    path.write_text("4242\n")  # a stale file of a daemon that died
    assert ops.daemon_pid(tmp_path) is None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert ops.daemon_pid(tmp_path) == os.getpid()
    finally:
        os.close(fd)
    assert ops.daemon_pid(tmp_path) is None


# -- what the package ships ---------------------------------------------------------------------------


def test_the_package_carries_the_repositorys_units_and_example_config(tmp_path: Path) -> None:
    shipped = service_files()
    for name, content in shipped.items():
        assert content == (REPO / name).read_bytes(), name
    written = write_service_files(tmp_path / "out")
    assert {path.name for path in written.values()} == {Path(name).name for name in SERVICE_FILES}
    with pytest.raises(Exception, match="not replaced"):
        write_service_files(tmp_path / "out")


def test_the_license_matches_pyproject() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in text and 'license-files = ["LICENSE"]' in text
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


def test_readme_links_stay_inside_the_repository() -> None:
    import re

    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        assert not re.match(r"^[a-z]+:", target), target
        if not target.startswith("#"):
            path = (REPO / target.split("#")[0]).resolve()
            assert path.is_relative_to(REPO) and path.exists(), target


def test_readme_has_the_exact_operator_commands_and_keys() -> None:
    readme = (REPO / "README.md").read_text()
    for name in _commands():
        assert f"batchd {name}" in readme, name
    for text in (
        "batchd batches [--live]",
        "batchd pause [ROUTE]",
        "batchd resume [ROUTE]",
        "batchd init-service --write DIR",
        "journalctl -u batchd -p warning",
        "$BATCHD_CONFIG",
        "/etc/batchd/batchd.toml",
        "daemon.done_retention",
        "daemon.rejected_retention",
        "daemon.out_retention",
        "daemon.rows_retention",
    ):
        assert text in readme, text


@pytest.mark.slow
def test_the_sdist_and_an_install_from_it_carry_the_service_files(tmp_path: Path) -> None:
    """`python -m build --sdist`, then a throwaway venv installs it and `batchd init-service --write`."""
    build = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [sdist] = list((tmp_path / "dist").glob("batchd-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in SERVICE_FILES:
        assert name in names and f"batchd/data/{name}" in names, name
    assert "LICENSE" in names
    # A throwaway venv without the dependencies: batchd.service needs none, so this shows what the
    # installed package itself carries (run from elsewhere, so the checkout is not what is imported).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(sdist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert (venv / "bin" / "batchd").exists()
    out = tmp_path / "units"
    program = (
        "import sys, batchd, batchd.service as s; from pathlib import Path;"
        " print(batchd.__file__); s.write_service_files(Path(sys.argv[1]))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    ran = subprocess.run(
        [str(venv / "bin" / "python"), "-c", program, str(out)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(str(venv)), ran.stdout
    assert (out / "batchd.service").read_bytes() == (REPO / "systemd" / "batchd.service").read_bytes()
    assert (out / "config.example.toml").read_bytes() == (REPO / "config.example.toml").read_bytes()
