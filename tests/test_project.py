"""Projects: module names resolve from the project root to files and their one element class."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from machinable import Execution, Experiment, Project, get
from conftest import write
from machinable.errors import ModuleNotFound, UsageError


OFFSPRING = """
from machinable import Experiment

class WhateverTheNameIs(Experiment):
    class Config:
        generations: int = 2

    def on_execute(self):
        return [self.config.generations, __name__]
"""


def test_the_project_is_the_cwd_unless_given(project, tmp_path):
    assert Project().path == project
    assert Project.get().path == project
    other = tmp_path / "other"
    other.mkdir()
    with Project(other) as p:
        assert Project.get() is p
    assert Project.get().path == project
    with pytest.raises(ModuleNotFound, match="does not exist"):
        Project(tmp_path / "missing")


@pytest.mark.parametrize("with_init", [True, False], ids=["package", "namespace-package"])
def test_dotted_names_map_to_packages(plain_project, with_init, capsys):
    if with_init:
        write(plain_project, "evolution/__init__.py", "")
    write(plain_project, "evolution/simulate_offspring.py", OFFSPRING)
    experiment = get("evolution.simulate_offspring", {"generations": 3})
    assert type(experiment).__name__ == "WhateverTheNameIs"  # the class name does not matter
    assert experiment.module == "evolution.simulate_offspring"
    experiment.launch()
    assert experiment.result == [3, "evolution.simulate_offspring"]
    assert get("./evolution/simulate_offspring.py", {"generations": 3}).experiment_id == experiment.experiment_id


def test_modules_in_a_project_given_by_path(tmp_path, monkeypatch):
    root = tmp_path / "research"
    write(root, "evolution/simulate_offspring.py", OFFSPRING)
    monkeypatch.chdir(tmp_path)
    experiment = get("evolution.simulate_offspring", project=Project(root))
    experiment.launch()
    assert experiment.directory.parent == root / "storage"
    with Project(root):
        assert get("evolution.simulate_offspring").experiment_id == experiment.experiment_id
    with pytest.raises(ModuleNotFound):
        get("evolution.simulate_offspring")  # not in the cwd


@pytest.mark.parametrize("name", ["../outside", "/abs/path", "a;rm -rf x", "a..b", "", "a b", "1abc", "a.b."])
def test_invalid_module_names_are_refused(project, name):
    with pytest.raises(ModuleNotFound, match="Invalid module name"):
        get(name)


def test_a_missing_module_suggests_a_close_one(project):
    with pytest.raises(ModuleNotFound, match=r"Module 'estimate_gravit' not found .* Did you mean 'estimate_gravity'\?"):
        get("estimate_gravit")
    assert issubclass(ModuleNotFound, UsageError)


def test_a_module_without_an_element_class_is_an_error(project):
    write(project, "empty.py", "X = 1\n")
    write(project, "only_import.py", "from estimate_gravity import EstimateGravity\n")
    with pytest.raises(ModuleNotFound, match=r"'empty' .* defines no Experiment or Execution class"):
        get("empty")
    # a class imported from another module is not this module's class
    with pytest.raises(ModuleNotFound, match="defines no Experiment"):
        get("only_import")


def test_a_module_with_two_element_classes_is_an_error(project):
    write(project, "two.py", """
        from machinable import Experiment

        class First(Experiment):
            pass

        class Second(Experiment):
            pass
    """)
    with pytest.raises(ModuleNotFound, match=r"'two' defines 2 element classes \(First, Second\); a module holds exactly one"):
        get("two")


def test_a_subclass_of_an_imported_base_is_the_one_class(project):
    write(project, "base.py", """
        from machinable import Experiment

        class Base(Experiment):
            class Config:
                x: int = 1

            def on_execute(self):
                return self.config.x * 10
    """)
    write(project, "derived.py", """
        from base import Base

        class Derived(Base):
            pass
    """)
    experiment = get("derived", {"x": 4})
    assert type(experiment).__name__ == "Derived"
    experiment.launch()
    assert experiment.result == 40
    assert set((experiment.directory / "code.json").read_text().split('"')) >= {"derived.py", "base.py"}


def test_element_class_checks_the_kind(project):
    assert issubclass(Project.get().element_class("estimate_gravity", Experiment), Experiment)
    with pytest.raises(ModuleNotFound, match="not a Execution"):
        Project.get().element_class("estimate_gravity", Execution)
    assert issubclass(Project.get().element_class("multiprocess_execution"), Execution)


def test_builtins_resolve_by_name(project):
    assert Project.get().element_class("machinable.execution.local").__name__ == "Local"
    assert Project.get().element_class("machinable.storage").__name__ == "Storage"


def test_edits_are_picked_up_in_the_same_process(project):
    write(project, "helper.py", "VALUE = 1\n")
    write(project, "reader.py", """
        from machinable import Experiment
        import helper

        class Reader(Experiment):
            def on_execute(self):
                return helper.VALUE
    """)
    first = Project.get().import_module("reader")
    assert first.helper.VALUE == 1
    assert Project.get().import_module("reader") is first  # unchanged: not re-imported

    write(project, "helper.py", "VALUE = 2\n")  # same size, within the same second
    second = Project.get().import_module("reader")
    assert second is not first and second.helper.VALUE == 2
    experiment = get("reader")
    experiment.launch()
    assert experiment.result == 2


def test_same_module_name_in_two_projects(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, value in ((a, "a"), (b, "b")):
        write(root, "same.py", f"""
            from machinable import Experiment

            class Same(Experiment):
                def on_execute(self):
                    return {value!r}
        """)
    monkeypatch.chdir(tmp_path)
    for root in (a, b, a):
        with Project(root):
            experiment = get("same")
            experiment.launch()
            assert experiment.result == root.name


def test_available_modules(project):
    write(project, "pkg/__init__.py", "")
    write(project, "pkg/mod.py", "")
    names = Project.get().available_modules()
    assert {"estimate_gravity", "multiprocess_execution", "pkg.mod"} <= set(names)


INLINE = """
from machinable import Experiment


class Mine(Experiment):
    class Config:
        a: int = 1

    def on_execute(self):
        print("ran", self.config.a)
        return self.config.a
"""


def test_an_experiment_defined_in_python_c_is_refused_when_made(project):
    from conftest import run_python

    result = run_python(project, INLINE + "\nMine()\n")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "machinable.errors.UsageError: Mine is defined in __main__ (a notebook, the REPL or python -c): machinable "
        "hashes and re-imports an experiment's code from its module file. Move the class into a module of the project "
        "(for example mine.py) and use get('mine')."
    )
    assert not (project / "storage").exists()


def test_an_experiment_defined_in_a_script_of_the_project_is_that_module(project):
    import subprocess
    import sys

    from conftest import commit_all

    write(project, "tools/run_mine.py", INLINE + """
if __name__ == "__main__":
    from machinable import get

    experiment = Mine({"a": 3})
    experiment.launch()
    print(experiment.module, experiment.result)
""")
    commit_all(project)
    result = subprocess.run([sys.executable, "tools/run_mine.py"], cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ran 3", "tools.run_mine 3"]
    again = get("tools.run_mine", {"a": 3})
    assert again.is_finished() and again.result == 3  # the same experiment, found by its module name


def test_an_execution_defined_in_python_c_still_runs_experiments(project):
    from conftest import run_python

    result = run_python(project, """
from machinable import Execution, get


class Inline(Execution):
    def on_dispatch(self):
        for experiment in self.experiments:
            experiment()


with Inline():
    get("estimate_gravity").launch()
""")
    assert result.returncode == 0, result.stderr
    assert "The gravity on the exoplanet is:" in result.stdout


def test_a_script_reached_through_a_symlinked_folder_is_still_a_project_module(project, tmp_path):
    import subprocess
    import sys

    from conftest import commit_all

    write(project, "run_here.py", INLINE + """
if __name__ == "__main__":
    experiment = Mine({"a": 4})
    experiment.launch()
    print(experiment.module)
""")
    commit_all(project)
    link = tmp_path / "link"
    link.symlink_to(project)
    result = subprocess.run([sys.executable, str(link / "run_here.py")], cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "run_here"
