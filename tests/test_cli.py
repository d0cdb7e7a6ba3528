"""The `machinable` command, run as a user runs it: real subprocesses in real git repositories."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from machinable import get
from machinable.cli import hoist_global_options, parse_module_args
from machinable.errors import UsageError

import doctools
from conftest import GIT_IDENTITY, REPO, TEMPLATE, git, run_machinable, write, commit_all
from doctools import console_steps

GRAVITY_15 = (
    "Assuming height of 52 and time of 0.44999999999999996\n"
    "The gravity on the exoplanet is:  513.5802469135804\n"
)


def experiment_dirs(storage: Path) -> list[Path]:
    if not storage.is_dir():
        return []
    return sorted(p for p in storage.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name))


def record(directory: Path) -> dict:
    return json.loads((directory / "experiment.json").read_text())


def events(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines() if line.strip()]


def snapshot(storage: Path) -> dict[str, tuple[int, int]]:
    """Every path under storage with size and mtime, except the derived SQLite index."""
    if not storage.exists():
        return {}
    out = {}
    for path in sorted(storage.rglob("*")):
        rel = path.relative_to(storage).as_posix()
        if rel.startswith("index.sqlite"):
            continue  # derived and rebuildable: a reader may refresh it
        stat = path.stat()
        out[rel] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """One clear line on stderr, the expected exit code, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert "Traceback" not in text, text
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- the launch grammar ----------------------------------------------------------------------


def test_launch_runs_the_experiment_and_records_it(project):
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    assert (result.returncode, result.stdout, result.stderr) == (0, GRAVITY_15, "")  # like experiment.launch()
    (directory,) = experiment_dirs(project / "storage")
    assert record(directory)["config"] == {"time_dilation": 1.5, "verbose": True}
    assert get("estimate_gravity", {"time_dilation": 1.5}).is_finished()
    verbose = run_machinable(project, "estimate_gravity", "time_dilation=2", "-v", "--launch")
    assert verbose.returncode == 0 and verbose.stdout.startswith("Assuming height")
    (new,) = [d for d in experiment_dirs(project / "storage") if d != directory]
    assert verbose.stderr == f"estimate_gravity {new.name[:12]}: finished (machinable show {new.name[:12]})\n"


def test_launching_a_finished_experiment_again_does_nothing(project):
    run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    again = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "already finished, nothing to do" in again.stderr
    assert len(experiment_dirs(project / "storage")) == 1


def test_later_modules_are_executions_used_as_context(project):
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "multiprocess_execution", "processes=4", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15
    (directory,) = experiment_dirs(project / "storage")
    started = [e for e in events(directory) if e["event"] == "started"]
    assert started[0]["pid"] != os.getpid()
    dispatched = [e for e in events(directory) if e["event"] == "dispatched"]
    assert dispatched[0]["execution"]["module"] == "multiprocess_execution"
    assert dispatched[0]["execution"]["config"] == {"processes": 4}


def test_builtin_execution_by_name(project):
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "machinable.execution.local", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15


def test_values_are_parsed_as_the_annotated_types(project):
    write(project, "typed.py", """
        from typing import Any, Literal, Optional
        from machinable import Experiment

        class Typed(Experiment):
            class Config:
                steps: int = 1
                rate: float = 0.5
                flag: bool = False
                name: str = "a"
                layers: list = None
                mode: Literal["fast", "slow"] = "fast"
                limit: Optional[int] = None
                extra: Any = None

            def on_execute(self):
                for key in ("steps", "rate", "flag", "name", "layers", "mode", "limit", "extra"):
                    print(key, repr(getattr(self.config, key)))
    """)
    result = run_machinable(
        project, "typed", "steps=3", "rate=2", "flag=true", "name=007", "layers=[1,2]", "mode=slow", "limit=none",
        'extra={"a": [1, 2.5]}', "--launch",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "steps 3", "rate 2.0", "flag True", "name '007'", "layers [1, 2]", "mode 'slow'", "limit None",
        "extra {'a': [1, 2.5]}",
    ]


def test_nested_configs_take_dotted_keys(project):
    write(project, "train.py", """
        from dataclasses import dataclass, field
        from machinable import Experiment

        @dataclass
        class Optimizer:
            lr: float = 0.01
            momentum: float = 0.9

        class Train(Experiment):
            class Config:
                optimizer: Optimizer = field(default_factory=Optimizer)
                epochs: int = 1

            def on_execute(self):
                print("lr", self.config.optimizer.lr, "momentum", self.config.optimizer.momentum)
    """)
    dry = run_machinable(project, "train", "optimizer.lr=0.1")
    assert dry.returncode == 0, dry.stderr
    assert "optimizer.lr = 0.1\n" in dry.stdout
    assert "optimizer.momentum = 0.9  (default)" in dry.stdout
    result = run_machinable(project, "train", "optimizer.lr=0.1", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "lr 0.1 momentum 0.9\n"
    (directory,) = experiment_dirs(project / "storage")
    assert record(directory)["config"] == {"optimizer": {"lr": 0.1, "momentum": 0.9}, "epochs": 1}
    bad = run_machinable(project, "train", "optimizer.lrr=0.1")
    assert_clean_error(bad, 2, "optimizer.lrr", "Did you mean")


def test_dry_run_shows_what_would_run_and_stores_nothing(project):
    storage = project / "storage"
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    expected = get("estimate_gravity", {"time_dilation": 1.5})
    assert "experiment   estimate_gravity  (estimate_gravity.py)" in out
    assert "config       time_dilation = 1.5\n" in out
    assert "verbose = True  (default)" in out
    assert f"config hash  {expected.config_hash}" in out
    assert f"code hash    {expected.code_hash}" in out
    assert "id           new: drawn at launch from a random seed (--seed N fixes it)" in out
    assert "record       none yet: --launch creates and runs it" in out
    assert "Dry run: nothing was executed or stored. Add --launch to run it." in out
    assert "Assuming height" not in out
    assert not storage.exists()


def test_dry_run_names_the_existing_record_and_changes_nothing(project):
    storage = project / "storage"
    run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    (directory,) = experiment_dirs(storage)
    before = snapshot(storage)
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5")
    assert result.returncode == 0, result.stderr
    seed = record(directory)["seed"]
    assert f"id           {directory.name}  (seed {seed})" in result.stdout
    assert "record       finished: --launch does nothing" in result.stdout
    new = run_machinable(project, "estimate_gravity", "time_dilation=2", "multiprocess_execution", "processes=2")
    assert new.returncode == 0, new.stderr
    assert "execution    multiprocess_execution\n" in new.stdout
    assert "processes = 2" in new.stdout
    assert snapshot(storage) == before


def test_dry_run_of_a_failed_experiment_says_launch_resumes_it(project):
    write(project, "flaky.py", """
        from machinable import Experiment

        class Flaky(Experiment):
            def on_execute(self):
                raise RuntimeError("boom")
    """)
    commit_all(project)
    failed = run_machinable(project, "flaky", "--launch")
    assert failed.returncode == 1
    dry = run_machinable(project, "flaky")
    assert "record       failed: --launch resumes it in place" in dry.stdout


def test_seed_fixes_the_id(project):
    expected = get("estimate_gravity", {"time_dilation": 1.5}, seed=42).experiment_id
    dry = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--seed", "42")
    assert f"id           {expected}  (seed 42)" in dry.stdout
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--seed", "42", "--launch")
    assert result.returncode == 0, result.stderr
    assert [d.name for d in experiment_dirs(project / "storage")] == [expected]
    assert record(project / "storage" / expected)["seed"] == 42


def test_an_out_of_range_seed_fails_the_dry_run_before_showing_an_id(project):
    result = run_machinable(project, "estimate_gravity", "--seed", "99999999999999999999999")
    assert_clean_error(result, 2, "Invalid seed 99999999999999999999999: a seed is an int from 0 to 2**63 - 1")
    assert result.stdout == ""


def test_replicate_launches_n_replicates_once(project):
    storage = project / "storage"
    result = run_machinable(project, "estimate_gravity", "verbose=false", "--replicate", "3", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("The gravity on the exoplanet is:") == 3
    dirs = experiment_dirs(storage)
    records = [record(d) for d in dirs]
    assert len(dirs) == 3
    assert len({r["seed"] for r in records}) == 3
    assert len({r["config_hash"] for r in records}) == 1
    again = run_machinable(project, "estimate_gravity", "verbose=false", "--replicate", "3", "--launch")
    assert again.returncode == 0 and again.stdout == ""
    assert "3 of 3 replicates already finished" in again.stderr
    dry = run_machinable(project, "estimate_gravity", "verbose=false", "--replicate", "4")
    assert "replicates   4 requested: 3 existing, 1 new" in dry.stdout
    more = run_machinable(project, "estimate_gravity", "verbose=false", "--replicate", "4", "--launch")
    assert more.stdout.count("The gravity on the exoplanet is:") == 1
    (added,) = [d for d in experiment_dirs(storage) if d not in dirs]
    # the added replicate is reported, with its id
    assert more.stderr.splitlines() == [
        "3 of 4 replicates already finished; launching the other 1",
        f"4 replicates: 3 already finished, 1 new finished ({added.name[:12]})",
    ]


def test_many_launches_print_plain_progress_lines_when_piped(project):
    for execution in ([], ["multiprocess_execution", "processes=2"]):
        result = run_machinable(project, "estimate_gravity", "verbose=false", "--replicate", "3", *execution, "--launch")
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        progress = [line for line in lines if line.startswith("[")]
        assert [line[:6] for line in progress] == ["[1/3] ", "[2/3] ", "[3/3] "]
        assert all(line.endswith(" finished") for line in progress)
        # the summary closes the list, after the last experiment's line
        assert lines[-1] == f"machinable: {execution[0] if execution else 'machinable.execution.local'}: 3 finished, 0 failed, 0 not started."
        assert "\x1b[" not in result.stderr
        shutil.rmtree(project / "storage")


def run_in_terminal(cwd: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    for key in ("NO_COLOR", "TERM_PROGRAM", "CI", "GITHUB_ACTIONS"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "machinable", *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            output += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), output.decode(errors="replace")


def test_many_launches_show_a_progress_bar_on_a_terminal(project):
    code, output = run_in_terminal(project, "estimate_gravity", "verbose=false", "--replicate", "3", "--launch")
    assert code == 0, output
    assert "━" in output and "3/3" in output
    assert output.count("The gravity on the exoplanet is:") == 3
    assert "[1/3]" not in output


def test_dirty_tree_is_recorded_and_said_in_one_line(project):
    (project / "notes.txt").write_text("uncommitted\n")
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15
    notes = [line for line in result.stderr.splitlines() if "uncommitted changes" in line]
    assert notes == ["Note: uncommitted changes in 1 file (notes.txt) are recorded with the experiment (git.diff); --require-clean refuses instead."]
    (directory,) = experiment_dirs(project / "storage")
    git_json = json.loads((directory / "git.json").read_text())
    assert git_json["dirty"] is True
    assert b"uncommitted" in (directory / "git.diff").read_bytes()


def test_require_clean_refuses_a_dirty_tree_listing_the_files(project):
    (project / "notes.txt").write_text("uncommitted\n")
    with open(project / "estimate_gravity.py", "a") as f:
        f.write("# edited\n")
    result = run_machinable(project, "estimate_gravity", "--require-clean", "--launch")
    assert_clean_error(result, 2, "--require-clean", "estimate_gravity.py", "notes.txt")
    assert result.stdout == ""
    assert experiment_dirs(project / "storage") == []
    commit_all(project)
    clean = run_machinable(project, "estimate_gravity", "--require-clean", "--launch")
    assert clean.returncode == 0, clean.stderr
    assert "uncommitted" not in clean.stderr


def test_a_dry_run_under_require_clean_refuses_before_printing(project):
    (project / "notes.txt").write_text("uncommitted\n")
    result = run_machinable(project, "estimate_gravity", "--require-clean")
    assert_clean_error(result, 2, "Refusing to launch: --require-clean", "notes.txt")
    assert result.stdout == ""


def test_require_clean_outside_a_repository(plain_project):
    result = run_machinable(plain_project, "estimate_gravity", "--require-clean", "--launch")
    assert_clean_error(result, 2, "needs a git repository")


def test_subcommand_names_are_reserved_and_modules_reachable_as_paths(project):
    write(project, "init.py", """
        from machinable import Experiment

        class Init(Experiment):
            def on_execute(self):
                print("the init module ran")
    """)
    commit_all(project)
    command = run_machinable(project, "init")
    assert command.returncode == 0, command.stderr
    assert "already holds the template" in command.stdout
    module = run_machinable(project, "./init.py", "--launch")
    assert module.returncode == 0, module.stderr
    assert module.stdout == "the init module ran\n"


def test_storage_option_sets_the_storage_for_the_run(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    result = run_machinable(project, "--storage", str(elsewhere), "estimate_gravity", "time_dilation=1.5", "--launch")
    assert result.returncode == 0, result.stderr
    assert len(experiment_dirs(elsewhere)) == 1
    assert not (project / "storage").exists()
    # global options may also come after the module
    again = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch", f"--storage={elsewhere}")
    assert "already finished" in again.stderr
    dry = run_machinable(project, "estimate_gravity", "--storage", "relative-storage")
    assert f"storage      {project / 'relative-storage'}" in dry.stdout


def test_hints_name_the_storage_the_command_used(project, tmp_path):
    """A next-step hint works when copied: it names a storage other than the default."""
    elsewhere = tmp_path / "elsewhere"
    first = run_machinable(project, "--storage", str(elsewhere), "estimate_gravity", "-v", "--launch")
    (directory,) = experiment_dirs(elsewhere)
    short = directory.name[:12]
    hint = f"machinable --storage {elsewhere} show {short}"
    assert first.stderr == f"estimate_gravity {short}: finished ({hint})\n"
    again = run_machinable(project, "estimate_gravity", "--launch", "--storage", str(elsewhere))
    assert again.stderr == f"estimate_gravity {short}: already finished, nothing to do ({hint})\n"
    copied = run_machinable(project, *hint.split()[1:])  # the hint, copied
    assert copied.returncode == 0 and copied.stdout.startswith(f"experiment {directory.name}")
    # the storage as context: the same
    context = tmp_path / "context"
    run_machinable(project, "estimate_gravity", "machinable.storage", f"directory={context}", "--launch")
    (directory,) = experiment_dirs(context)
    again = run_machinable(project, "estimate_gravity", "machinable.storage", f"directory={context}", "--launch")
    assert f"(machinable --storage {context} show {directory.name[:12]})" in again.stderr
    # errors name it too
    missing = run_machinable(project, "--storage", str(context), "show", "abc")
    assert f"`machinable --storage {context} list` shows the stored ones" in missing.stderr
    # the default storage needs no option
    run_machinable(project, "estimate_gravity", "--launch")
    plain = run_machinable(project, "--storage", str(project / "storage"), "estimate_gravity", "--launch")
    assert "(machinable show " in plain.stderr


def test_storage_option_and_storage_context_together_are_refused(project, tmp_path):
    result = run_machinable(project, "--storage", str(tmp_path / "a"), "estimate_gravity", "machinable.storage",
                            f"directory={tmp_path / 'b'}", "--launch")
    assert_clean_error(result, 2, "Both --storage and machinable.storage choose the storage")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_integral_floats_are_ints_on_the_command_line_as_in_python(project):
    write(project, "epochs.py", """
        from machinable import Experiment

        class Epochs(Experiment):
            class Config:
                epochs: int = 1

            def on_execute(self):
                print("epochs", repr(self.config.epochs))
    """)
    result = run_machinable(project, "epochs", "epochs=3.0", "--seed", "7", "--launch")
    assert (result.returncode, result.stdout) == (0, "epochs 3\n"), result.stderr
    assert [d.name for d in experiment_dirs(project / "storage")] == [get("epochs", {"epochs": 3.0}, seed=7).experiment_id]
    assert_clean_error(run_machinable(project, "epochs", "epochs=3.5"), 2, "Invalid value '3.5'", "expected an int")


def test_version(project):
    from machinable import __version__

    result = run_machinable(project, "--version")
    assert (result.returncode, result.stdout) == (0, f"machinable {__version__}\n")


def test_python_dash_m_machinable_is_the_same_command(project):
    result = subprocess.run([sys.executable, "-m", "machinable", "estimate_gravity", "time_dilation=1.5", "--launch"],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15


def test_no_arguments_shows_the_help(project):
    result = run_machinable(project)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: machinable [OPTIONS] MODULE [KEY=VALUE]... | COMMAND [ARGS]...")
    text = " ".join(result.stdout.split())
    assert "launch grammar" in text and "seed grammar" not in text  # --seed is an option; the grammar is not about seeds
    for option in ("--launch", "--seed", "--replicate", "--require-clean", "--wait", "--force-new", "--verbose"):
        assert option in text, option


def test_short_options_mean_one_thing():
    """-n is list's --limit (not also gc's --dry-run); --all of list is now --no-limit (status/reproduce keep theirs)."""
    assert "-n, --limit N" in help_text("list") and "-n" not in help_text("gc")
    assert "--no-limit" in help_text("list") and "--all" not in help_text("list")


# --- errors: one line, no traceback, exit 2 for usage errors and 1 for failed runs -------------

USAGE_ERRORS = [
    (["estimate_gravit"], ["Module 'estimate_gravit' not found", "Did you mean 'estimate_gravity'?"]),
    (["ini"], ["Module 'ini' not found", "Did you mean the command 'init'?"]),
    (["estimate_gravity", "time_diliation=2"], ["Unknown config key 'time_diliation'", "Did you mean 'time_dilation'?"]),
    (["estimate_gravity", "time_dilation=fast"], ["Invalid value 'fast'", "time_dilation", "expected a float"]),
    (["estimate_gravity", "verbose=maybe"], ["Invalid value 'maybe'", "verbose", "expected a bool (true/false, yes/no, on/off, 1/0)"]),
    (["estimate_gravity", "TIME_DILATION=2"], ["Unknown config key 'TIME_DILATION'", "Did you mean 'time_dilation'?"]),
    (["estimate_gravity", "time_dilation", "2"], ["Module 'time_dilation' not found",
                                                   "'time_dilation' is a config key of estimate_gravity: did you mean time_dilation=2?"]),
    (["estimate_gravity", "verbose"], ["did you mean verbose=VALUE?"]),
    (["estimate_gravity", "time_dilation==1"], ["'time_dilation==1'", "single '='", "did you mean time_dilation=1?"]),
    (["estimate_gravity", "=1"], ["'=1'", "key before '=' is missing"]),
    (["estimate_gravity", "time_dilation="], ["'time_dilation='", "value after '=' is missing"]),
    (["estimate_gravity", "time-dilation=1"], ["Invalid config key 'time-dilation'"]),
    (["estimate_gravity", "time_dilation=1", "time_dilation=2"], ["given twice"]),
    (["time_dilation=1.5", "estimate_gravity"], ["comes before any module"]),
    (["multiprocess_execution", "processes=2"], ["'multiprocess_execution' is not an experiment", "the first module is the experiment"]),
    (["estimate_gravity", "estimate_gravity"], ["only the first module is the experiment"]),
    (["estimate_gravity", "multiprocess_execution", "processes=many"], ["Invalid value 'many'", "processes", "expected an int"]),
    (["estimate_gravity", "multiprocess_execution", "machinable.execution.local"], ["Two executions given"]),
    (["estimate_gravity", "--seed", "1", "--replicate", "2"], ["--seed and --replicate exclude each other"]),
    (["estimate_gravity", "--seed", "abc"], ["'--seed'", "abc"]),
    (["estimate_gravity", "--seed", "99999999999999999999999"], ["Invalid seed 99999999999999999999999", "from 0 to 2**63 - 1"]),
    (["estimate_gravity", "--seed", "-1"], ["Invalid seed -1", "from 0 to 2**63 - 1"]),
    (["estimate_gravity", "--replicate", "0"], ["'--replicate'"]),
    (["estimate_gravity", "--lauch"], ["No such option: --lauch", "--launch"]),
    (["bad-name"], ["Invalid module name 'bad-name'"]),
]


@pytest.mark.parametrize(("args", "needles"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_without_traceback(project, args, needles):
    result = run_machinable(project, *args, "--launch")
    assert_clean_error(result, 2, *needles)
    assert result.stdout == ""
    assert not (project / "storage").exists()


def test_an_ambiguous_id_prefix_is_a_usage_error(project):
    from collections import Counter

    for _ in range(17):  # 17 ids over 16 hex digits: two share their first digit
        get.new("estimate_gravity", {"verbose": False}).commit()
    first = Counter(d.name[0] for d in experiment_dirs(project / "storage"))
    prefix = next(c for c, n in first.items() if n > 1)
    result = run_machinable(project, "reproduce", prefix)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: Experiment id prefix '{prefix}' is ambiguous")


def test_a_module_name_where_an_id_belongs_names_the_command_meant(project):
    for args, hint in [
        (["reproduce", "estimate_gravity"], "For every finished experiment of module estimate_gravity: machinable reproduce --all estimate_gravity"),
        (["show", "estimate_gravity"], "For the experiments of module estimate_gravity: machinable list estimate_gravity"),
        (["diff", "estimate_gravity", "abc"], "machinable list estimate_gravity"),
    ]:
        result = run_machinable(project, *args)
        assert_clean_error(result, 2, "'estimate_gravity' is not an experiment id", hint)


def test_debug_shows_the_traceback(project):
    result = run_machinable(project, "--debug", "estimate_gravity", "time_diliation=2")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: Unknown config key 'time_diliation'")
    # --debug may also come last
    late = run_machinable(project, "estimate_gravity", "time_diliation=2", "--debug")
    assert "Traceback" in late.stderr


def test_a_module_that_fails_to_import_is_one_line(project):
    write(project, "broken.py", """
        from machinable import Experiment
        import not_a_module_anywhere

        class Broken(Experiment):
            pass
    """)
    write(project, "syntax.py", "def (:\n")
    result = run_machinable(project, "broken", "--launch")
    assert_clean_error(result, 2, "broken", "not_a_module_anywhere")
    result = run_machinable(project, "syntax", "--launch")
    line = assert_clean_error(result, 2, "syntax")
    assert "line 1" in line


def test_storage_not_writable_is_one_line_and_exit_1(project, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_machinable(project, "--storage", str(blocker / "storage"), "estimate_gravity", "--launch")
    assert_clean_error(result, 1, "storage", str(blocker / "storage"))
    assert result.stdout == ""


def test_a_failed_run_exits_1_and_says_how_to_continue(project):
    write(project, "failing.py", """
        from machinable import Experiment

        class Failing(Experiment):
            def on_execute(self):
                print("working")
                raise ValueError("the experiment broke")
    """)
    commit_all(project)
    result = run_machinable(project, "failing", "--launch")
    assert result.returncode == 1
    assert "working" in result.stdout
    # the experiment's own traceback is its output (also in output.log); machinable adds one summary
    assert "ValueError: the experiment broke" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "1 failed" in errors[0]
    assert "machinable show" in result.stderr


# --- init ----------------------------------------------------------------------------------------


def template_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_packaged_template_equals_the_repository_template():
    packaged = REPO / "machinable" / "_template"
    assert template_bytes(packaged) == template_bytes(TEMPLATE), (
        "machinable/_template (what `machinable init` writes from an installed package) differs from "
        ".machinable-template: copy the changed files over, e.g. "
        "rm -r machinable/_template && cp -a .machinable-template machinable/_template"
    )


def test_init_creates_a_committed_project_that_launches_clean(tmp_path):
    result = run_machinable(tmp_path, "init", "gravity-demo", env=GIT_IDENTITY)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "gravity-demo"
    files = {k: v for k, v in template_bytes(demo).items() if not k.startswith(".git/")}
    assert files == template_bytes(TEMPLATE)
    assert result.stdout.splitlines() == [
        f"Created a machinable project in gravity-demo: {', '.join(template_bytes(TEMPLATE))}",
        "git: new repository, with the template as its first commit",
        "Next: cd gravity-demo && machinable estimate_gravity --launch",
    ]
    assert git(demo, "status", "--porcelain") == ""
    assert git(demo, "log", "--format=%s").splitlines() == ["machinable init"]
    launch = run_machinable(demo, "estimate_gravity", "--launch")
    assert launch.returncode == 0, launch.stderr
    assert launch.stdout == "Assuming height of 52 and time of 0.3\nThe gravity on the exoplanet is:  1155.5555555555557\n"
    (directory,) = experiment_dirs(demo / "storage")
    assert json.loads((directory / "git.json").read_text())["dirty"] is False


def test_init_in_the_current_folder(tmp_path):
    result = run_machinable(tmp_path, "init", "--no-git")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "estimate_gravity.py").is_file()
    assert not (tmp_path / ".git").exists()
    assert result.stdout.splitlines()[-1] == "Next: machinable estimate_gravity --launch"


def test_init_inside_a_repository_leaves_committing_to_the_user(project):
    result = run_machinable(project, "init", "experiments/sub")
    assert result.returncode == 0, result.stderr
    assert not (project / "experiments" / "sub" / ".git").exists()
    assert "git: inside the repository at" in result.stdout
    assert "(git add experiments/sub && git commit)" in result.stdout
    assert git(project, "log", "--format=%s").splitlines() == ["initial"]


def test_init_without_a_git_identity_commits_the_template_as_machinable(tmp_path):
    home = tmp_path / "home"  # no ~/.gitconfig, no identity from the environment
    home.mkdir()
    env = {"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(home / "none")}
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        env[key] = ""
    result = subprocess.run([sys.executable, "-m", "machinable", "init", "demo"], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in {**os.environ, **env}.items() if v != ""})
    assert result.returncode == 0, result.stderr
    assert "git: new repository, with the template as its first commit (author machinable init <machinable-init@localhost>: " \
           "git has no user.name/user.email yet; set them before your own commits)" in result.stdout
    assert git(tmp_path / "demo", "log", "--format=%an <%ae>") == "machinable init <machinable-init@localhost>\n"
    assert git(tmp_path / "demo", "status", "--porcelain") == ""


def test_init_names_a_folder_under_home_with_a_tilde(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "clone"
    home.mkdir()
    elsewhere.mkdir()
    result = run_machinable(elsewhere, "init", str(home / "gravity-demo"), env={"HOME": str(home), **GIT_IDENTITY})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("Created a machinable project in ~/gravity-demo: ")
    assert result.stdout.splitlines()[-1] == "Next: cd ~/gravity-demo && machinable estimate_gravity --launch"


def test_init_never_overwrites(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "estimate_gravity.py").write_text("mine\n")
    result = run_machinable(tmp_path, "init", "demo")
    assert_clean_error(result, 2, "estimate_gravity.py already exists")
    assert (demo / "estimate_gravity.py").read_text() == "mine\n"
    assert sorted(p.name for p in demo.iterdir()) == ["estimate_gravity.py"]


def test_init_works_from_a_regular_install(tmp_path):
    """`pip install .` (not editable) ships the template as package data."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "storage", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "benchmarks", "tests"))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    assert not (target / "machinable" / "_template").is_symlink()
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import machinable; print(machinable.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, **env})
    assert where.stdout.strip() == str(target / "machinable" / "__init__.py")
    result = subprocess.run([sys.executable, "-m", "machinable", "init", "--no-git", "demo"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    assert template_bytes(tmp_path / "demo") == template_bytes(TEMPLATE)


# --- completion ----------------------------------------------------------------------------------


def complete(cwd: Path, line: str) -> list[str]:
    words = line.split(" ")
    env = {"_MACHINABLE_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    result = run_machinable(cwd, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_shell_completion_of_modules_commands_and_options(project):
    assert complete(project, "machinable est") == ["estimate_gravity"]
    assert "init" in complete(project, "machinable in")
    assert "MODULE" not in complete(project, "machinable ")
    assert complete(project, "machinable estimate_gravity --la") == ["--launch"]
    script = run_machinable(project, "--show-completion", "bash")
    assert script.returncode == 0 and "_MACHINABLE_COMPLETE" in script.stdout


# --- helpers (in-process) -----------------------------------------------------------------------


def test_parse_module_args():
    specs = parse_module_args(["estimate_gravity", "time_dilation=1.5", "multiprocess_execution", "processes=4", "x.y=a=b"])
    assert [(s.name, s.values) for s in specs] == [
        ("estimate_gravity", {"time_dilation": "1.5"}),
        ("multiprocess_execution", {"processes": "4", "x.y": "a=b"}),
    ]
    with pytest.raises(UsageError):
        parse_module_args([])


def test_global_options_are_hoisted_from_anywhere():
    assert hoist_global_options(["m", "a=1", "--storage", "s", "--launch", "--debug"]) == ["--storage", "s", "--debug", "m", "a=1", "--launch"]
    assert hoist_global_options(["m", "--storage=s"]) == ["--storage=s", "m"]
    assert hoist_global_options(["m", "--", "--debug"]) == ["m", "--", "--debug"]


# --- docs/cli.md: the examples run as shown, the reference matches the app -----------------------

DOCS = REPO / "docs" / "cli.md"
BEGIN, END = "<!-- BEGIN REFERENCE", "<!-- END REFERENCE -->"


def help_text(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "machinable", *args, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def reference_markdown() -> str:
    """The reference section of docs/cli.md: every command's --help."""
    from machinable.cli import SEED_COMMAND, app, app_commands

    hidden = {c.name for c in app.registered_commands if c.hidden}
    sections = [("machinable", []), ("machinable MODULE", [SEED_COMMAND])]
    sections += [(f"machinable {name}", [name]) for name in app_commands() if name != SEED_COMMAND and name not in hidden]
    parts = []
    for title, args in sections:
        command = " ".join(["machinable", *args, "--help"])
        parts.append(f"### `{title}`\n\n```text\n$ {command}\n{help_text(*args)}```\n")
    return "\n".join(parts)


def test_reference_is_in_sync_with_the_cli():
    text = DOCS.read_text()
    start = text.index("-->", text.index(BEGIN)) + len("-->\n")
    end = text.index(END)
    generated = reference_markdown()
    if os.environ.get("MACHINABLE_UPDATE_DOCS") == "1":
        DOCS.write_text(text[:start] + generated + text[end:])
        return
    assert text[start:end] == generated, (
        "docs/cli.md's reference differs from the CLI's --help output; regenerate it with "
        "MACHINABLE_UPDATE_DOCS=1 python -m pytest tests/test_cli.py -k reference"
    )


def console_blocks(markdown: str) -> list[list[tuple[str, str]]]:
    """``console`` code blocks as lists of (command, expected output)."""
    blocks = []
    for body in re.findall(r"```console\n(.*?)```", markdown, flags=re.S):
        blocks.append(console_steps(body))
    return blocks


def matches(expected: str, actual: str) -> bool:
    """``...`` alone on a line matches any lines; inside a line, any text; every line ends in a newline."""
    return doctools.matches(expected, actual, terminated=True)


def test_matches():
    assert matches("a ... c\n...\nz\n", "a b c\nx\ny\nz\n")
    assert matches("a\n...\nz\n", "a\nz\n")
    assert not matches("a b\n", "a c\n")
    assert not matches("a ... c\n", "a\nc\n")


def test_examples_in_the_cli_docs_run_as_shown(tmp_path):
    import shlex

    blocks = console_blocks(DOCS.read_text())
    assert len(blocks) >= 5
    cwd = tmp_path
    for block in blocks:
        for command, expected in block:
            words = shlex.split(command)
            if words[0] == "cd":
                cwd = cwd / words[1]
                continue
            assert words[0] == "machinable", command
            result = subprocess.run([sys.executable, "-m", "machinable", *words[1:]], cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env={**os.environ, **GIT_IDENTITY})
            assert matches(expected, result.stdout), f"$ {command}\n--- expected ---\n{expected}--- got ---\n{result.stdout}"
