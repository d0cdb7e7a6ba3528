"""Security: permissions, untrusted data files, shells, temporary worktrees.

- Records, the index and every other file machinable creates follow the
  user's umask and are never writable by others, even under ``umask 0``.
- ``load_data``/``save_data`` refuse names that lead outside the
  experiment's own data/ folder (``..``, absolute paths, symlinks), so a
  pickle from elsewhere is never loaded by accident.
- No config value reaches a shell unquoted: experiments travel to worker
  processes and cluster jobs by id, and the Slurm job script quotes every
  path (a storage folder named with shell syntax and newlines included).
- ``reproduce`` runs recorded code only in a temporary git worktree that is
  removed afterwards.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import git, run_machinable

SHELLY = '''
from machinable import Experiment


class Shelly(Experiment):
    class Config:
        text: str = ""

    def on_execute(self):
        print("TEXT=" + repr(self.config.text))
        return self.config.text
'''

NASTY = "$(touch pwned); `touch pwned` ; touch pwned && 'quote\" \\\\ \nnewline | rm -rf ~ #"


@pytest.fixture
def shelly_project(project):
    (project / "shelly.py").write_text(SHELLY)
    git(project, "add", "shelly.py")
    git(project, "commit", "-q", "-m", "shelly")
    return project


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")] if not p.is_symlink()}


LAUNCH_ALL = """
from machinable import get
get("estimate_gravity", {"verbose": False}).launch()      # finished and sealed
get("estimate_gravity", {"time_dilation": 2.0}).commit()  # stored, not run
"""


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_records_and_index_follow_the_umask_and_are_never_world_writable(project, tmp_path, umask):
    storage = tmp_path / "storage"
    env = {**os.environ, "MACHINABLE_STORAGE": str(storage)}

    def run(args: list[str]) -> None:
        result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, preexec_fn=lambda: os.umask(umask))
        assert result.returncode == 0, result.stderr

    run([sys.executable, "-c", LAUNCH_ALL])
    if umask == 0o000:  # a reproduction adds its record beside the sealed one
        finished = next(p.name for p in storage.iterdir() if (p / "MANIFEST").exists())
        run([sys.executable, "-m", "machinable.cli", "reproduce", finished])
        assert list(storage.glob("*/reproductions/*/verdict.json"))
    run([sys.executable, "-m", "machinable.cli", "verify"])
    run([sys.executable, "-m", "machinable.cli", "gc", "--dry-run"])
    modes = _modes(storage)
    assert any(name.startswith("index.sqlite") for name in modes)
    assert any(name.startswith(".objects/") for name in modes)
    world_writable = {name: oct(mode) for name, mode in modes.items() if mode & stat.S_IWOTH}
    assert not world_writable
    if umask == 0o077:
        assert {name: oct(mode) for name, mode in modes.items() if mode & 0o077} == {}
    if umask == 0o022:  # the umask is honoured, not replaced by a private mode
        assert modes["index.sqlite"] & stat.S_IROTH
        assert all(mode & stat.S_IROTH for mode in modes.values())


def test_load_data_refuses_files_outside_the_experiments_data_folder(project, tmp_path):
    from machinable import get
    from machinable.errors import ConfigError

    experiment = get("estimate_gravity", {"verbose": False})
    experiment.commit()
    experiment.save_data("mine.pickle", {"a": 1})
    assert experiment.load_data("mine.pickle") == {"a": 1}

    marker = tmp_path / "unpickled-foreign-code"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps(Evil()))
    (experiment.directory / "data" / "link.pickle").symlink_to(evil)

    for name in ("../experiment.json", "../../index.sqlite", str(evil), "/etc/passwd", "sub/../../x.pickle", "link.pickle", "", "."):
        with pytest.raises(ConfigError, match="inside the experiment's data/ folder"):
            experiment.load_data(name)
        with pytest.raises(ConfigError):
            experiment.save_data(name, b"x")
    assert not marker.exists()

    # data/ itself replaced by a link to somewhere else
    data = experiment.directory / "data"
    for item in data.iterdir():
        item.unlink()
    data.rmdir()
    data.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ConfigError):
        experiment.load_data("evil.pickle")
    assert not marker.exists()
    assert "trusted" in type(experiment).load_data.__doc__


def test_config_values_travel_to_workers_by_id_never_through_a_shell(shelly_project):
    from machinable import get

    for execution in ("machinable.execution.process", "machinable.execution.multiprocess"):
        experiment = get.new("shelly", {"text": NASTY})
        with get(execution):
            experiment.launch()
        assert experiment.is_finished()
        assert experiment.result == NASTY
    result = run_machinable(shelly_project, "shelly", f"text={NASTY}", "machinable.execution.process", "--launch")
    assert result.returncode == 0, result.stderr
    assert not list(shelly_project.rglob("pwned")) and not (Path.home() / "pwned").exists()


def test_slurm_job_script_quotes_paths_with_shell_syntax_and_newlines(shelly_project, tmp_path):
    """The job script, run by bash exactly as Slurm would, hands every path to Python unchanged."""
    from machinable import get

    recorder = tmp_path / "recorder"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    storage = tmp_path / "st $(touch pwned); x\nline2 'q\"`touch pwned`"
    folder = storage / ".slurm" / "job"
    folder.mkdir(parents=True)
    execution = get("machinable.execution.slurm", {"python": str(recorder)})
    script = folder / "job.sh"
    script.write_text(execution.job_script(shelly_project, storage, ["0" * 32], folder))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import json

    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["-m", "machinable.executions.slurm_job", str(shelly_project), str(storage), "0" * 32, str(folder / "job.log")]
    assert not list(tmp_path.rglob("pwned")) and not (shelly_project / "pwned").exists()


def test_slurm_end_to_end_with_shell_syntax_in_config_and_storage(shelly_project, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_slurm import _slurm_problem

    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("MACHINABLE_REQUIRE_SLURM") == "1":
            pytest.fail(f"MACHINABLE_REQUIRE_SLURM=1, but {problem}")
        pytest.skip(problem)
    from machinable import get

    storage = tmp_path / "st $(touch pwned); x\nline2 'q\"`touch pwned`"
    with get("machinable.storage", {"directory": str(storage)}):
        experiment = get("shelly", {"text": NASTY})
        with get("machinable.execution.slurm", {"time": "00:05:00"}):
            experiment.launch()
        experiment.wait(timeout=120)
        assert experiment.is_finished(), experiment.events()[-1]
        assert experiment.result == NASTY
    assert not list(tmp_path.rglob("pwned")) and not list(shelly_project.rglob("pwned"))


def test_reproduce_runs_in_a_temporary_worktree_that_is_removed(shelly_project, tmp_path):
    (shelly_project / "noisy.py").write_text(
        "import random\nfrom machinable import Experiment\n\n"
        "class Noisy(Experiment):\n    def on_execute(self):\n        return random.random()\n"
    )
    git(shelly_project, "add", "noisy.py")
    git(shelly_project, "commit", "-q", "-m", "noisy")
    from machinable import get

    reproducible, noisy = get("shelly", {"text": "same"}), get("noisy")
    reproducible.launch()
    noisy.launch()
    worktrees = git(shelly_project, "worktree", "list")
    scratch = tmp_path / "tmp"  # the reproductions' temporary folders go here
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}

    assert run_machinable(shelly_project, "reproduce", reproducible.short_id, "--check", env=env).returncode == 0
    assert run_machinable(shelly_project, "reproduce", noisy.short_id, "--check", env=env).returncode == 1  # mismatch
    assert git(shelly_project, "worktree", "list") == worktrees
    assert not list((shelly_project / ".git").glob("worktrees/*"))
    assert not list(scratch.glob("machinable-reproduce-*")), list(scratch.iterdir())
