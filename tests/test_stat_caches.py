"""The stat-validated caches behind fast relaunches never hide a change.

``git.capture`` reuses its last result while nothing git looks at changed, and
``closure_of`` reuses a hashed import closure (in-process, and across
processes through ``<storage>/.cache``). Every test makes one kind of change
after the cache is in use and checks that the next answer shows it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from machinable import git as mgit
from machinable import hashing
from machinable.hashing import closure_of

from conftest import git, run_python, write


@pytest.fixture
def no_racy_window(monkeypatch):
    """Trust stats at once. The tests then wait a clock tick before each change
    (what the racy window stands for); changes within a tick are tested with it."""
    monkeypatch.setattr(mgit, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.0)


def tick() -> None:
    time.sleep(0.05)  # longer than a coarse file system clock tick


def capture(project: Path) -> dict:
    info, diff = mgit.capture(project, exclude=[project / "storage"])
    return {**info, "diff": diff}


def cached(project: Path) -> bool:
    return (str(project), (str(project / "storage"),)) in mgit._snapshots


# --- git capture ---------------------------------------------------------------------


def test_a_repeated_capture_reuses_the_result_until_a_tracked_file_changes(project, no_racy_window):
    first = capture(project)
    assert not first["dirty"] and cached(project)
    assert capture(project) == first
    tick()
    (project / "estimate_gravity.py").write_text((project / "estimate_gravity.py").read_text() + "\n# more\n")
    second = capture(project)
    assert second["dirty"] and second["changed_files"] == ["estimate_gravity.py"]
    assert b"# more" in second["diff"]


def test_new_untracked_files_show_but_ignored_and_storage_files_do_not(project, no_racy_window):
    capture(project)
    tick()
    (project / "storage").mkdir()
    tick()
    (project / "storage" / "x.json").write_text("{}")
    tick()
    (project / "__pycache__").mkdir(exist_ok=True)
    tick()
    (project / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert not capture(project)["dirty"]
    tick()
    (project / "sub").mkdir()
    tick()
    (project / "sub" / "notes.txt").write_text("new")
    info = capture(project)
    assert info["untracked_files"] == ["sub/notes.txt"] and b"new" in info["diff"]
    tick()
    (project / "sub" / "notes.txt").write_text("newer text")
    assert b"newer text" in capture(project)["diff"]  # an untracked file's content is watched too


def test_a_commit_a_checkout_and_ignore_rules_are_seen(project, no_racy_window):
    tick()
    (project / "a.txt").write_text("a")
    assert capture(project)["untracked_files"] == ["a.txt"]
    tick()
    git(project, "add", "a.txt")
    git(project, "commit", "-q", "-m", "add a")
    info = capture(project)
    assert not info["dirty"] and info["commit"] == git(project, "rev-parse", "HEAD").strip()
    tick()
    git(project, "checkout", "-q", "-b", "other")
    assert capture(project)["branch"] == "other"
    tick()
    (project / "b.log").write_text("log")
    assert capture(project)["untracked_files"] == ["b.log"]
    tick()
    (project / ".git" / "info").mkdir(exist_ok=True)
    tick()
    (project / ".git" / "info" / "exclude").write_text("*.log\n")
    assert not capture(project)["dirty"]


def test_an_edit_within_the_racy_window_is_seen_even_with_the_same_size_and_mtime(project):
    path = project / "estimate_gravity.py"
    text = path.read_text()
    path.write_text(text.replace("52", "53"))
    stat = path.stat()
    first = capture(project)
    assert first["dirty"] and not cached(project)  # just changed: not trusted by its stat
    path.write_text(text.replace("52", "54"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert b"54" in capture(project)["diff"]


# --- import closures ---------------------------------------------------------------------


def test_a_closure_is_reused_until_a_file_changes(tmp_path, no_racy_window):
    entry = write(tmp_path, "main.py", "import helper\n")
    tick()
    write(tmp_path, "helper.py", "X = 1\n")
    first = closure_of(tmp_path, entry)
    assert closure_of(tmp_path, entry) is first  # the same closure object: nothing was re-read
    tick()
    write(tmp_path, "helper.py", "X = 22\n")
    assert closure_of(tmp_path, entry).code_hash != first.code_hash


def test_a_module_that_appears_joins_the_closure(tmp_path, no_racy_window):
    entry = write(tmp_path, "main.py", "import helper\nimport pkg.sub\n")
    before = closure_of(tmp_path, entry)
    assert set(before.files) == {"main.py"} and {"helper", "pkg"} <= before.third_party
    tick()
    write(tmp_path, "helper.py", "X = 1\n")
    assert set(closure_of(tmp_path, entry).files) == {"main.py", "helper.py"}
    tick()
    write(tmp_path, "pkg/__init__.py", "")
    tick()
    write(tmp_path, "pkg/sub.py", "Y = 2\n")
    assert set(closure_of(tmp_path, entry).files) == {"main.py", "helper.py", "pkg/__init__.py", "pkg/sub.py"}
    tick()
    (tmp_path / "pkg" / "sub.py").unlink()
    assert set(closure_of(tmp_path, entry).files) == {"main.py", "helper.py", "pkg/__init__.py"}


def test_a_new_process_reuses_the_closure_from_the_storage_cache_and_sees_edits(project):
    script = (
        "from machinable import get\n"
        "e = get.new('estimate_gravity')\n"
        "print(e.code_hash)\n"
    )
    first = run_python(project, script)
    assert first.returncode == 0, first.stderr
    run_python(project, "from machinable import get; get('estimate_gravity', {'verbose': False}).launch()")
    time.sleep(hashing.RACY_SECONDS + 0.1)  # let the files settle so that the cache is written
    warm = run_python(project, script)
    assert (project / "storage" / ".cache" / "closures.json").exists()
    again = run_python(project, script)
    assert first.stdout == warm.stdout == again.stdout
    path = project / "estimate_gravity.py"
    path.write_text(path.read_text().replace("height = 52", "height = 53"))
    edited = run_python(project, script)
    assert edited.returncode == 0 and edited.stdout != first.stdout


def test_a_damaged_storage_cache_is_ignored(project):
    (project / "storage" / ".cache").mkdir(parents=True)
    (project / "storage" / ".cache" / "closures.json").write_text("{not json")
    result = run_python(project, "from machinable import get; print(get.new('estimate_gravity').code_hash)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("xxh3-128:")
