"""The curated public API: a short, deliberate list (like httpx's test_exported_members).

Adding a name to ``machinable.__all__`` is a decision: update EXPECTED here in
the same change, and the CHANGELOG.
"""

from __future__ import annotations

import types

import machinable
from conftest import run_python

EXPECTED = ["Execution", "Experiment", "Project", "Storage", "__version__", "get"]


def test_all_is_the_curated_list():
    assert machinable.__all__ == EXPECTED
    assert dir(machinable) == sorted(EXPECTED)


def test_every_exported_name_resolves_to_its_home_module():
    homes = {
        "get": "machinable.experiment",
        "Experiment": "machinable.experiment",
        "Execution": "machinable.execution",
        "Project": "machinable.project",
        "Storage": "machinable.storage",
    }
    for name, module in homes.items():
        value = getattr(machinable, name)
        assert getattr(value, "__module__", None) == module or type(value).__module__ == module, name
    assert isinstance(machinable.__version__, str) and machinable.__version__.count(".") >= 2


def test_no_other_public_names_are_exported():
    for name in machinable.__all__:
        getattr(machinable, name)
    public = {
        name for name, value in vars(machinable).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    typing_helpers = {"annotations", "TYPE_CHECKING", "Any"}  # used by __init__.py itself, not API
    assert public - typing_helpers == set(EXPECTED) - {"__version__"}


def test_unknown_attributes_raise_attribute_error():
    try:
        machinable.not_a_thing  # noqa: B018
    except AttributeError as e:
        assert "not_a_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_machinable_has_no_side_effects(tmp_path):
    """No folders, no threads, no heavy imports (GitPython, sqlite3, rich, user code)."""
    code = (
        "import os, sys, threading\n"
        "before = sorted(os.listdir('.'))\n"
        "import machinable\n"
        "assert sorted(os.listdir('.')) == before, os.listdir('.')\n"
        "assert threading.active_count() == 1\n"
        "heavy = [m for m in ('git', 'sqlite3', 'rich', 'orjson', 'machinable.experiment') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = run_python(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


def test_getting_an_experiment_does_not_import_gitpython_or_write(project):
    code = (
        "import os, sys\n"
        "from machinable import get\n"
        "e = get('estimate_gravity')\n"
        "print('git' in sys.modules, os.path.exists('storage'))\n"
    )
    proc = run_python(project, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
