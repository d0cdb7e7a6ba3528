"""show and diff of stored experiments: each section, the verdict, damage tolerance.

Every scenario is a real change a user makes between two runs (a config
value, a helper file, a comment, a commit, an import of another package, a
different output), recorded by real launches in a committed git project.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest

from machinable import Storage, get
from machinable.diff import Snapshot, config_defaults, diff
from machinable.experiment import summarize_records
from machinable.errors import ExecutionError, ExperimentNotFound
from conftest import commit_all, git

TRAIN = '''from machinable import Experiment

import helpers


class Train(Experiment):
    class Config:
        lr: float = 0.1
        epochs: int = 3
        name: str = "baseline"

    def on_execute(self):
        for epoch in range(self.config.epochs):
            self.record(epoch=epoch, loss=helpers.loss(self.config.lr, epoch))
        self.save_data("weights.json", {"lr": self.config.lr})
        print("trained", self.config.name)
        return helpers.loss(self.config.lr, self.config.epochs)
'''

HELPERS = '''def loss(lr, epoch):
    return 1.0 / (1 + lr * (epoch + 1))
'''


@pytest.fixture
def train(project):
    (project / "train.py").write_text(TRAIN)
    (project / "helpers.py").write_text(HELPERS)
    git(project, "add", "train.py", "helpers.py")
    git(project, "commit", "-q", "-m", "train")
    return project


def launched(config: dict | None = None, *, new: bool = False):
    experiment = (get.new if new else get)("train", config or {})
    experiment.launch()
    return experiment


def writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


# --- the verdict and each section ----------------------------------------------------------


def test_config_change_is_named_as_the_cause(train):
    a = launched({"lr": 0.1})
    b = launched({"lr": 0.5})
    result = a.diff(b)
    assert result.sections["config"] == {"changed": {"lr": [0.1, 0.5]}}
    assert result.causes == ["config key lr (0.1 -> 0.5)", f"seed ({a.seed} -> {b.seed})"]
    assert result.verdict.startswith("The ids differ because of config key lr (0.1 -> 0.5)")
    assert not result.sections["code"] and not result.sections["git"] and not result.sections["environment"]
    outputs = result.sections["outputs"]
    assert outputs["result"] == [a.result, b.result]
    assert set(outputs["records"]["keys"]) == {"loss"}  # epochs are the same, losses differ
    assert list(outputs["data"]["changed"]) == ["result.json", "weights.json"]
    text = str(result)
    assert text.splitlines()[1] == f"why: {result.verdict}"
    assert "  lr: 0.1 -> 0.5" in text
    assert "(no differences in code, git, environment)" in text


def test_a_changed_helper_file_is_named_with_a_diff_of_its_stored_source(train):
    a = launched()
    (train / "helpers.py").write_text(HELPERS.replace("1 + lr", "2 + lr"))
    commit_all(train, "change the loss")
    b = launched()
    assert a.experiment_id != b.experiment_id
    result = diff(a, b)
    code = result.sections["code"]
    assert code["changed"] == ["helpers.py"]
    assert "-    return 1.0 / (1 + lr * (epoch + 1))" in code["diffs"]["helpers.py"]
    assert "+    return 1.0 / (2 + lr * (epoch + 1))" in code["diffs"]["helpers.py"]
    assert "file helpers.py (changed)" in result.causes
    assert not result.sections["config"]
    # git: the commit changed, and the commit in between is listed
    assert result.sections["git"]["commit"] == [Snapshot.of(a).git["commit"], Snapshot.of(b).git["commit"]]
    [commits] = [v for k, v in result.sections["git"]["commits"].items() if v]
    assert any("change the loss" in line for line in commits)


def test_added_and_removed_closure_files(train):
    a = launched()
    (train / "extra.py").write_text("SCALE = 1\n")
    (train / "train.py").write_text(TRAIN.replace("import helpers\n", "import helpers\nimport extra\n"))
    commit_all(train, "extra")
    b = launched()
    code = diff(a, b).sections["code"]
    assert code["added"] == ["extra.py"] and code["changed"] == ["train.py"]
    assert "+SCALE = 1" in code["diffs"]["extra.py"]
    assert diff(b, a).sections["code"]["removed"] == ["extra.py"]
    assert "file" in diff(b, a).verdict and "extra.py (removed)" in diff(b, a).verdict


def test_comment_only_edits_do_not_change_the_id_but_show_as_formatting(train):
    a = launched()
    (train / "helpers.py").write_text("# a comment\n" + HELPERS)
    commit_all(train, "comment")
    assert get("train").experiment_id == a.experiment_id  # same code hash: the same experiment
    b = launched(new=True)  # a replicate recorded with the commented source
    result = diff(a, b)
    assert result.sections["code"]["formatting_only"] == ["helpers.py"]
    assert "+# a comment" in result.sections["code"]["diffs"]["helpers.py"]
    assert result.verdict == f"Replicates: same config and code, only the seed differs ({a.seed} -> {b.seed})."


def test_uncommitted_changes_are_compared(train):
    a = launched()
    (train / "helpers.py").write_text(HELPERS + "\nUNUSED = 1\n")
    b = launched()
    git_section = diff(a, b).sections["git"]
    assert git_section["dirty"] == [False, True]
    assert git_section["uncommitted"]["files_a"] == [] and git_section["uncommitted"]["files_b"] == ["helpers.py"]
    assert "++UNUSED = 1" in git_section["uncommitted"]["diff"]


READER = """from pathlib import Path

from machinable import Experiment


class Reader(Experiment):
    def on_execute(self):
        return Path("value.txt").read_text()
"""


def test_show_and_diff_use_the_git_state_the_finishing_attempt_ran_with(train):
    (train / "reader.py").write_text(READER)
    commit_all(train, "reader")
    commit = git(train, "rev-parse", "HEAD").strip()
    resumed = get("reader")
    with pytest.raises(Exception, match="value.txt"):
        resumed.launch()
    (train / "value.txt").write_text("uncommitted value\n")
    resumed.launch()  # attempt 2, with value.txt untracked
    replica = get.new("reader")
    replica.launch()  # created and run with value.txt untracked

    shown = Snapshot.of(resumed)
    text = shown.render()
    assert f"commit {commit} on main, dirty (1 untracked; " in text and "recorded in attempts/2/git.diff)" in text
    assert "  ? value.txt" in text
    assert f"(attempt 2 ran with this state, recorded in attempts/2/; at creation: commit {commit}, clean)" in text
    as_json = shown.as_json()["git"]
    assert as_json["dirty"] is True and as_json["untracked_files"] == ["value.txt"]
    assert as_json["recorded_in"] == "attempts/2/git.json" and as_json["uncommitted_diff_bytes"] > 0
    assert "attempt 2 ran with" not in Snapshot.of(replica).render()
    # both ran with the same tree: the git section has nothing to tell apart
    assert diff(resumed, replica).sections["git"] == {}


def test_environment_section_lists_package_changes(train):
    a = launched()
    (train / "helpers.py").write_text("import xxhash\n\n" + HELPERS)
    commit_all(train, "import xxhash")
    b = launched()
    import xxhash

    environment = diff(a, b).sections["environment"]
    # a did not import xxhash (installed all along): it is not in a's env.json, which says what was imported
    assert environment["packages"] == {"xxhash": ["(not imported)", xxhash.VERSION]}
    assert f"xxhash: (not imported) -> {xxhash.VERSION}" in str(diff(a, b))


def test_replicates_and_the_same_experiment(train):
    a = launched()
    b = a.replicate()
    b.launch()
    result = a.diff(b)
    assert result.causes == [f"seed ({a.seed} -> {b.seed})"]
    assert result.verdict.startswith("Replicates")
    assert not any(result.sections.values())  # deterministic: nothing else differs
    same = a.diff(a.experiment_id[:8])
    assert same.verdict == "Same experiment (same id)." and not same


def test_outputs_records_and_data_files(train):
    a = launched({"epochs": 2})
    b = launched({"epochs": 4})
    outputs = diff(a, b).sections["outputs"]
    assert outputs["records"]["rows"] == [2, 4]
    epoch_a, epoch_b = outputs["records"]["keys"]["epoch"]
    assert (epoch_a["max"], epoch_b["max"]) == (1, 3)
    assert list(outputs["data"]["changed"]) == ["result.json"]  # weights.json holds the same lr in both
    assert "records: 2 -> 4 rows" in str(diff(a, b))


def test_json_output_has_every_section(train):
    a = launched({"lr": 0.1})
    b = launched({"lr": 0.2})
    document = orjson.loads(orjson.dumps(diff(a, b).as_json(), option=orjson.OPT_NON_STR_KEYS))
    assert set(document["sections"]) == {"config", "code", "git", "environment", "outputs"}
    assert document["a"]["id"] == a.experiment_id and document["same"] is False
    assert document["causes"][0] == "config key lr (0.1 -> 0.2)"


# --- show ------------------------------------------------------------------------------------------


def test_show_marks_defaults_and_lists_everything_stored(train):
    experiment = launched({"lr": 0.5})
    snapshot = Snapshot.of(experiment)
    text = str(snapshot)
    assert text.splitlines()[0] == f"experiment {experiment.experiment_id}"
    assert "  lr      0.5\n" in text
    assert "  epochs  3  (default)" in text
    assert "  name    'baseline'  (default)" in text
    for path in ("train.py", "helpers.py"):
        assert f"  {path}  xxh3-128:" in text
    assert "commit " in text and "on main, clean" in text
    assert "python " in text and "machinable " in text
    events = text.split("\nevents\n")[1].split("\nrecords")[0].splitlines()
    assert [line.split()[2] for line in events] == ["created", "dispatched", "started", "finished"]
    assert "records (3 rows)" in text and "  loss" in text and "mean=" in text
    assert "weights.json" in text and "trained baseline" in text.split("output (")[1]
    document = snapshot.as_json()
    assert document["config"]["lr"] == {"value": 0.5, "default": False}
    assert document["config"]["epochs"] == {"value": 3, "default": True}
    assert document["records"]["summary"]["epoch"] == {"count": 3, "last": 2, "min": 0, "max": 2, "mean": 1.0}
    assert [e["event"] for e in document["events"]] == ["created", "dispatched", "started", "finished"]


def test_show_of_a_failed_run_has_the_traceback(train):
    (train / "helpers.py").write_text(HELPERS.replace("return 1.0", "raise ValueError('diverged')\n    return 1.0"))
    commit_all(train, "broken")
    experiment = get("train")
    with pytest.raises(ExecutionError):
        experiment.launch()
    text = str(Snapshot.of(experiment))
    assert "state        failed" in text
    assert "ValueError: diverged" in text


def test_damaged_files_are_shown_as_damaged_never_a_crash(train):
    a = launched({"lr": 0.1})
    b = launched({"lr": 0.2})
    writable(a.directory)
    with open(a.directory / "records.jsonl", "ab") as f:
        f.write(b"{this is not json}\n")
    (a.directory / "env.json").write_text("garbage")
    (a.directory / "code.json").unlink()
    snapshot = Snapshot.of(a)
    text = str(snapshot)
    assert "records (3 rows)  [DAMAGED: records.jsonl: 1 damaged line skipped]" in text
    assert "environment  [DAMAGED: env.json is damaged" in text
    assert "code (import closure)  [DAMAGED: code.json is missing]" in text
    result = diff(a, b)
    assert "note: a's environment is damaged" in str(result)
    (a.directory / "experiment.json").write_text("{")
    broken = Snapshot.of(a)
    assert "DAMAGED: experiment.json is damaged" in str(broken)
    assert diff(a, b).causes[0].startswith("unknown: the record of")


def test_an_unstored_experiment_cannot_be_shown(train):
    with pytest.raises(ExperimentNotFound, match="not stored yet"):
        Snapshot.of(get.new("train"))


# --- helpers ---------------------------------------------------------------------------------------


def test_records_summary_and_table(train):
    experiment = launched({"epochs": 3})
    records = experiment.records()
    assert [row["epoch"] for row in records] == [0, 1, 2]
    assert records.columns() == ["epoch", "loss"]
    assert records.summary()["epoch"]["mean"] == 1.0
    table = records.as_table()
    try:
        import pandas  # noqa: F401
    except ImportError:
        lines = str(table).splitlines()
        assert lines[0].split() == ["epoch", "loss"]
        assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
        assert repr(table) == str(table)
    else:
        assert list(table.columns) == ["epoch", "loss"] and len(table) == 3


CONFIGURED = '''import enum
from dataclasses import dataclass, field

from machinable import Experiment


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Optimizer:
    lr: float = 0.01
    momentum: float = 0.9


class Config:
    epochs: int = field(default=3)
    tags: list = field(default_factory=lambda: ["a", "b"])
    names: list = field(default_factory=list)
    optimizer: Optimizer = field(default_factory=Optimizer)
    mode: Mode = Mode.FAST


class Configured(Experiment):
    Config = Config

    def on_execute(self):
        return Point(self.config.epochs)


class Point:
    def __init__(self, x):
        self.x = x

    def __repr__(self):
        return f"Point(x={self.x})"
'''

SETTINGS = '''class Shared:
    width: int = 8
'''


def test_defaults_are_marked_for_a_module_level_config_factories_and_nested_dataclasses(project):
    (project / "configured.py").write_text(CONFIGURED)
    commit_all(project, "configured")
    experiment = get("configured", {"optimizer.lr": 0.1})
    experiment.launch()
    snapshot = Snapshot.of(experiment)
    marks = {key: entry["default"] for key, entry in snapshot.as_json()["config"].items()}
    assert marks == {"epochs": True, "tags": True, "names": True, "optimizer.lr": False, "optimizer.momentum": True,
                     "mode": True}
    text = str(snapshot)
    assert "  epochs              3  (default)" in text and "  optimizer.lr        0.1\n" in text
    other = get("configured", {"epochs": 4, "tags": ["c"], "mode": "SLOW"})
    other.launch()
    marks = {key: entry["default"] for key, entry in Snapshot.of(other).as_json()["config"].items()}
    assert {key for key, default in marks.items() if not default} == {"epochs", "tags", "mode"}


def test_a_config_imported_from_another_project_module():
    sources = {"settings": SETTINGS.encode()}
    source = b"from settings import Shared\nfrom machinable import Experiment\n\nclass E(Experiment):\n    Config = Shared\n"
    assert config_defaults(source, sources.get) == {"width": 8}
    assert config_defaults(source) == {}  # without the other module's source: unknown


def test_a_pickled_result_shows_as_its_repr(project):
    (project / "configured.py").write_text(CONFIGURED)
    commit_all(project, "configured")
    a = get("configured")
    a.launch()
    b = get("configured", {"epochs": 5})
    b.launch()
    snapshot = Snapshot.of(a)
    assert "result  Point(x=3)  (pickled)" in str(snapshot)
    digest = snapshot.data_files["result.pickle"]["digest"]
    assert snapshot.as_json()["result"] == {"pickle": digest, "repr": "Point(x=3)"}
    assert "  result: Point(x=3)  (pickled) -> Point(x=5)  (pickled)" in str(diff(a, b))
    # only the record's own file is loaded: a link out of the folder is not followed
    writable(a.directory)
    pickled = a.directory / "data" / "result.pickle"
    outside = project / "elsewhere.pickle"
    outside.write_bytes(pickled.read_bytes())
    pickled.unlink()
    pickled.symlink_to(outside)
    assert "not loaded: data/result.pickle is a link out of the record" in str(Snapshot.of(a))


def test_summary_and_defaults_helpers():
    assert summarize_records([{"a": 1, "b": "x"}, {"a": 3, "b": True}]) == {
        "a": {"count": 2, "last": 3, "min": 1, "max": 3, "mean": 2.0},
        "b": {"count": 2, "last": True},
    }
    source = b"class E:\n    class Config:\n        a: int = 1\n        b: tuple = (1, 2)\n        c: object = make()\n"
    defaults = config_defaults(source)
    assert defaults["a"] == 1 and defaults["b"] == (1, 2) and "c" in defaults
    assert config_defaults(b"def (") == {}
