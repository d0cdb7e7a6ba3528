"""Git metadata: HEAD from .git directly, the full uncommitted diff (untracked, binary), no repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson

from machinable import get
from machinable.git import capture, read_head

from conftest import TEMPLATE, git, run_python


def test_read_head_matches_git(project):
    head = read_head(project)
    assert head is not None
    assert head.commit == git(project, "rev-parse", "HEAD").strip()
    assert head.branch == "main"
    assert head.worktree == project
    sub = project / "deep" / "er"
    sub.mkdir(parents=True)
    assert read_head(sub).commit == head.commit  # found from a subfolder


def test_read_head_detached_packed_and_linked_worktree(project, tmp_path):
    commit = git(project, "rev-parse", "HEAD").strip()
    git(project, "pack-refs", "--all")
    assert not (project / ".git" / "refs" / "heads" / "main").exists()
    assert read_head(project).commit == commit  # from packed-refs
    linked = tmp_path / "linked"
    git(project, "worktree", "add", "-q", "-b", "feature", str(linked))
    head = read_head(linked)
    assert (head.commit, head.branch, head.worktree) == (commit, "feature", linked)
    git(project, "checkout", "-q", "--detach")
    head = read_head(project)
    assert (head.commit, head.branch) == (commit, None)


def test_read_head_of_a_repository_without_commits(tmp_path):
    git(tmp_path, "init", "-q", "-b", "trunk")
    head = read_head(tmp_path)
    assert (head.commit, head.branch) == (None, "trunk")


def test_clean_tree(project):
    git(project, "remote", "add", "origin", "https://example.org/lab/project.git")
    info, diff = capture(project)
    assert info["repository"] is True
    assert info["commit"] == git(project, "rev-parse", "HEAD").strip()
    assert info["branch"] == "main"
    assert info["remote"] == "https://example.org/lab/project.git"
    assert info["dirty"] is False and info["changed_files"] == [] and info["untracked_files"] == []
    assert diff == b""


def test_the_diff_holds_every_uncommitted_change_and_applies_to_the_commit(project, tmp_path):
    (project / "estimate_gravity.py").write_text((project / "estimate_gravity.py").read_text().replace("52", "53"))
    (project / "multiprocess_execution.py").unlink()
    (project / "helper.py").write_text("# untracked helper\nVALUE = 1\n")
    binary = bytes(range(256)) * 8
    (project / "data").mkdir()
    (project / "data" / "blob.bin").write_bytes(binary)
    (project / "staged.txt").write_text("staged\n")
    git(project, "add", "staged.txt")
    index_before = (project / ".git" / "index").read_bytes()

    info, diff = capture(project)
    assert info["dirty"] is True
    assert set(info["changed_files"]) == {"estimate_gravity.py", "multiprocess_execution.py", "staged.txt"}
    assert set(info["untracked_files"]) == {"helper.py", "data/blob.bin"}
    assert b"VALUE = 1" in diff and b"GIT binary patch" in diff
    # the real index was not touched
    assert (project / ".git" / "index").read_bytes() == index_before
    assert git(project, "diff", "--cached", "--name-only").split() == ["staged.txt"]

    # the recorded commit + the recorded diff is exactly the working tree
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    subprocess.run(["git", "apply", "--binary", "-"], cwd=clone, input=diff, check=True)
    for rel in ("estimate_gravity.py", "helper.py", "data/blob.bin", "staged.txt"):
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    assert not (clone / "multiprocess_execution.py").exists()


def test_ignored_files_and_the_storage_are_not_in_the_diff(project):
    (project / ".gitignore").write_text("*.cache\n")
    git(project, "commit", "-qam", "ignore caches")
    (project / "big.cache").write_text("ignored")
    (project / "results").mkdir()
    (project / "results" / "x.txt").write_text("y")
    info, diff = capture(project, exclude=[project / "results"])
    assert info["untracked_files"] == [] and diff == b""
    assert info["dirty"] is False


def test_experiments_record_git_json_and_git_diff(project):
    (project / "notes.txt").write_text("untracked notes\n")
    experiment = get("estimate_gravity")
    experiment.launch()
    info = orjson.loads((experiment.directory / "git.json").read_bytes())
    assert info["format"] == 1 and info["repository"] is True
    assert info["commit"] == git(project, "rev-parse", "HEAD").strip()
    assert info["branch"] == "main" and info["remote"] is None
    assert info["dirty"] is True and info["untracked_files"] == ["notes.txt"]
    diff = (experiment.directory / "git.diff").read_bytes()
    assert b"+untracked notes" in diff
    assert b"storage/" not in diff  # the experiment's own storage is never part of it


def test_outside_a_repository_everything_works(plain_project, capsys):
    info, diff = capture(plain_project)
    assert info == {"repository": False, "note": "not inside a git repository"} and diff == b""
    experiment = get("estimate_gravity")
    experiment.launch()
    assert capsys.readouterr().out.endswith("1155.5555555555557\n")
    assert experiment.is_finished()
    stored = orjson.loads((experiment.directory / "git.json").read_bytes())
    assert stored == {"format": 1, "repository": False, "note": "not inside a git repository"}
    assert (experiment.directory / "git.diff").read_bytes() == b""


def test_gitpython_is_imported_only_when_needed(project):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from machinable.git import read_head\n"
        "import machinable, machinable.experiment\n"
        "read_head(Path('.'))\n"
        "print('git' in sys.modules)\n"
        "from machinable.git import capture\n"
        "info, diff = capture(Path('.'))\n"
        "print(info['dirty'], 'git' in sys.modules)\n"  # a clean tree: `git status` alone
        "Path('notes.txt').write_text('new')\n"
        "info, diff = capture(Path('.'))\n"
        "print(info['dirty'], 'git' in sys.modules)\n"  # a diff to take: GitPython
    )
    proc = run_python(project, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False", "True", "True"]


def test_a_project_inside_a_larger_repository(tmp_path, monkeypatch):
    """The project is a subfolder of the repository: the diff covers the whole repository."""
    repo = tmp_path / "repo"
    project = repo / "experiments"
    shutil.copytree(TEMPLATE, project)
    (repo / "README").write_text("top\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "README").write_text("top, edited\n")
    proc = run_python(project, "from machinable import get\ne = get('estimate_gravity')\ne.launch()\nprint(e.directory)")
    assert proc.returncode == 0, proc.stderr
    directory = Path(proc.stdout.splitlines()[-1])
    assert directory.parent == project / "storage"
    info = orjson.loads((directory / "git.json").read_bytes())
    assert info["changed_files"] == ["README"] and info["worktree"] == str(repo)
    assert b"+top, edited" in (directory / "git.diff").read_bytes()
