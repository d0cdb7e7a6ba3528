"""The ``machinable`` command: a thin typer app over the Python API.

Two shapes of command line::

    machinable [GLOBAL OPTIONS] MODULE [KEY=VALUE]... [MODULE [KEY=VALUE]...]... [--launch]
    machinable [GLOBAL OPTIONS] COMMAND [ARGS]...

The first (the launch grammar) dry-runs or launches an experiment; the second
runs a subcommand (``init``, ``list``, ``show``, ...). Subcommand names are
reserved words: a project module with such a name is reachable as
``./name.py``.

Layout of this file, so that each area can add its commands without touching
the others:

- the app and its global options (``--storage``, ``--debug``, ``--version``);
- the launch grammar (``MODULE key=value ... --launch``);
- subcommands, one function each (``@app.command()``), imports inside;
- the entry point ``main()``: error handling (one line, no traceback, exit 2
  for usage errors and 1 for failed runs; ``--debug`` shows the traceback).

Heavy modules (GitPython, sqlite3, rich tables, user code) are imported
inside the commands, never at module level, so ``--help`` stays fast.
"""

# No ``from __future__ import annotations`` here: typer would then eval every
# parameter annotation from its string at each start (about 40% more start-up
# instructions for `machinable --help`).
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

PROG = "machinable"

#: the hidden-in-plain-sight command that handles ``MODULE key=value ...``;
#: never dispatched by name (a project module called MODULE still works).
SEED_COMMAND = "MODULE"

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_state: dict[str, Any] = {"debug": False}


def _silence(stream: Any) -> None:
    from machinable.storage import silence

    silence(stream)


def _out(text: str = "") -> None:
    """A line of the command's own output (stdout)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `machinable status | head`: the reader has all it wants. Not an error: the
        # command goes on without output, so its exit code still tells its verdict.
        _silence(sys.stdout)
        _state["stdout_closed"] = True


def _note(text: str) -> None:
    """A status line (stderr, so stdout carries only the experiments' output).

    A reader of stderr that went away (``2>&1 | head``) stops nothing: the
    command goes on, so its exit code still tells how it went.
    """
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence(sys.stderr)


# --- the app and its global options -----------------------------------------------


class _Group(TyperGroup):
    """Routes a first word that is not a subcommand to the launch grammar."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] != SEED_COMMAND and (args[0] in self.commands or args[0].startswith("-")):
            return super().resolve_command(ctx, args)
        return SEED_COMMAND, self.commands[SEED_COMMAND], args

    def shell_complete(self, ctx: Any, incomplete: str) -> list[Any]:
        items = [item for item in super().shell_complete(ctx, incomplete) if item.value != SEED_COMMAND]
        if incomplete.startswith("-"):
            return items
        CompletionItem = _click().shell_completion.CompletionItem

        try:
            from machinable.project import Project

            modules = Project().available_modules()
        except Exception:  # completion must never fail loudly
            modules = []
        reserved = set(self.commands)
        for name in modules:
            if name.startswith(incomplete):
                items.append(CompletionItem(f"./{name.replace('.', '/')}.py" if name in reserved else name, help="module"))
        return items


app = typer.Typer(
    cls=_Group,
    name=PROG,
    add_completion=True,
    no_args_is_help=True,
    subcommand_metavar="MODULE [KEY=VALUE]... | COMMAND [ARGS]...",
    rich_markup_mode=None,  # plain click help: rich's help renderer imports rich.table
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "machinable: content-addressed, git-integrated experiments.\n\n"
        "Dry-run or launch an experiment (the launch grammar: modules, each followed by "
        "its config values):\n\n"
        "    machinable MODULE [KEY=VALUE]... [EXECUTION [KEY=VALUE]...] [--launch]\n\n"
        "The first module is the experiment, later modules (executions, storage) are "
        "used as context. Without --launch nothing runs and nothing is stored. "
        "`machinable MODULE --help` lists the options (--launch, --seed, --replicate, "
        "--require-clean, --wait, --force-new, --verbose).\n\n"
        "Command names are reserved: a project module with such a name is reachable "
        "as ./NAME.py. Global options may also come after the command."
    ),
)


def _version(value: bool) -> None:
    if value:
        from machinable import __version__

        _out(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    storage: Annotated[
        Optional[Path],
        typer.Option("--storage", metavar="PATH", help="Storage folder for this run (default: $MACHINABLE_STORAGE or ./storage).", show_default=False),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True
    if storage is not None:
        # through the environment, so that every command, the API underneath
        # and worker processes spawned by executions all use the same storage
        _state["storage_option"] = True
        _state.setdefault("default_storage", os.environ.get("MACHINABLE_STORAGE") or None)
        os.environ["MACHINABLE_STORAGE"] = os.path.abspath(os.path.expanduser(str(storage)))


def _storage_root() -> Path | None:
    """The storage folder this command uses if it is not the one a plain
    ``machinable`` command in this folder would find (None: the default)."""
    from machinable.project import Project

    chosen = _state.get("storage_root")
    if chosen is None and _state.get("storage_option"):
        chosen = Path(os.environ["MACHINABLE_STORAGE"])
    if chosen is None:
        return None
    default = _state.get("default_storage", os.environ.get("MACHINABLE_STORAGE"))
    try:
        root = Path(os.path.abspath(os.path.expanduser(default))) if default else Project.get().path / "storage"
    except Exception:  # no project here: say the storage anyway
        root = None
    return None if root is not None and Path(os.path.abspath(root)) == Path(os.path.abspath(chosen)) else Path(chosen)


def command_hint(command: str) -> str:
    """``machinable COMMAND`` as the user can copy it: with ``--storage PATH``
    when this command ran on a storage other than the default one."""
    import shlex

    root = _storage_root()
    return f"{PROG} --storage {shlex.quote(str(root))} {command}" if root is not None else f"{PROG} {command}"


# --- the launch grammar: MODULE key=value ... [EXECUTION key=value ...] ------------------


@dataclass
class ModuleArgs:
    """One module of the command line with the ``key=value`` pairs after it."""

    name: str
    values: dict[str, str] = field(default_factory=dict)


def parse_module_args(tokens: list[str]) -> list[ModuleArgs]:
    """``["m", "a=1", "e", "b=2"]`` -> ``[ModuleArgs("m", {"a": "1"}), ModuleArgs("e", {"b": "2"})]``."""
    from machinable.errors import UsageError

    specs: list[ModuleArgs] = []
    for token in tokens:
        if "=" not in token:
            specs.append(ModuleArgs(token))
            continue
        key, _, value = token.partition("=")
        if not key:
            raise UsageError(f"Invalid argument {token!r}: the key before '=' is missing; write key=value.")
        if value.startswith("="):
            raise UsageError(f"Invalid argument {token!r}: write key=value with a single '=' (did you mean {key}={value.lstrip('=')}?).")
        if not value:
            raise UsageError(f"Invalid argument {token!r}: the value after '=' is missing; write {key}=VALUE.")
        if not _KEY.match(key):
            raise UsageError(
                f"Invalid config key {key!r} in {token!r}: keys are Python names, dotted for nested configs (optimizer.lr=0.1)."
            )
        if not specs:
            raise UsageError(f"Argument {token!r} comes before any module: write MODULE key=value, for example estimate_gravity {token}.")
        if key in specs[-1].values:
            raise UsageError(f"Config key {key!r} is given twice for {specs[-1].name!r} ({key}={specs[-1].values[key]} and {token}).")
        specs[-1].values[key] = value
    if not specs:
        raise UsageError("No module given: write machinable MODULE [key=value ...] [--launch].")
    return specs


class _SeedCommand(TyperCommand):
    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(PROG, "MODULE [KEY=VALUE]... [EXECUTION [KEY=VALUE]...] [OPTIONS]")


@app.command(
    SEED_COMMAND, cls=_SeedCommand, short_help="Dry-run or --launch an experiment (the launch grammar above).",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def seed_grammar(
    arguments: Annotated[
        list[str],
        typer.Argument(metavar="MODULE [KEY=VALUE]...", show_default=False, hidden=True),
    ],
    launch: Annotated[bool, typer.Option("--launch", help="Run it (without: a dry run that executes and stores nothing).")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Use this seed (fixes the experiment id).", show_default=False)] = None,
    replicate: Annotated[
        Optional[int],
        typer.Option("--replicate", metavar="N", min=1, help="N replicates (same config, own seeds): reuses existing ones, adds the rest.", show_default=False),
    ] = None,
    require_clean: Annotated[bool, typer.Option("--require-clean", help="Refuse to launch from a git tree with uncommitted changes.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="With a non-blocking execution (Slurm): block until the launched experiments end.")] = False,
    force_new: Annotated[bool, typer.Option("--force-new", help="A new experiment (new seed), even if one with this config is stored (for example a damaged one).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also say on standard error when an experiment finished, with its id.")] = False,
) -> None:
    """Dry-run or --launch an experiment: MODULE [KEY=VALUE]... [EXECUTION [KEY=VALUE]...].

    The first module is the experiment; later modules (executions, storage) are
    used as context. Values are parsed as the Config's annotated types; nested
    configs take dotted keys (optimizer.lr=0.1). The built-in executions are
    local, process, multiprocess and slurm (short for
    machinable.execution.NAME; a project module of that name comes first).
    """
    from contextlib import ExitStack

    from machinable.errors import UsageError

    if seed is not None and replicate is not None:
        raise UsageError("--seed and --replicate exclude each other: replicates differ by their seeds.")
    if force_new and (seed is not None or replicate is not None):
        raise UsageError("--force-new makes one new experiment with a new seed: leave out --seed and --replicate.")
    specs = parse_module_args(arguments)
    with ExitStack() as stack:
        execution = None
        for spec in specs[1:]:
            element = _context_element(spec, specs)
            from machinable.execution import Execution
            from machinable.storage import Storage

            if isinstance(element, Execution):
                if execution is not None:
                    raise UsageError(
                        f"Two executions given ({execution.module!r} and {element.module!r}): give at most one."
                    )
                execution = element
            else:
                if isinstance(element, Storage):
                    if _state.get("storage_option"):
                        raise UsageError(
                            f"Both --storage and {spec.name} choose the storage: give only one of them "
                            f"(--storage {os.environ['MACHINABLE_STORAGE']} or {spec.name} directory={element.root})."
                        )
                    _state["storage_root"] = element.root
                stack.enter_context(element)
        experiment, experiments = _experiments(specs[0], seed, replicate, force_new)
        if not launch:
            _dry_run(experiment, experiments, execution, require_clean, replicate, seed)
            return
        _launch(experiments, execution, require_clean, wait, verbose=verbose, replicate=replicate)


def _element_class(name: str) -> type:
    """The element class of module ``name``; user-code import errors become one line."""
    from machinable.errors import MachinableError, ModuleNotFound
    from machinable.project import Project

    project = Project.get()
    try:
        return project.element_class(name)
    except ModuleNotFound as e:
        hint = _command_hint(name)
        if hint and "not found" in str(e):
            raise ModuleNotFound(f"{e} {hint}") from None
        raise
    except MachinableError:
        raise
    except Exception as e:
        raise _import_failed(name, e) from e


def _command_hint(name: str) -> str:
    import difflib

    commands = [c for c in app_commands() if c != SEED_COMMAND]
    close = difflib.get_close_matches(name, commands, n=1)
    return f"Did you mean the command {close[0]!r}?" if close else ""


def app_commands() -> list[str]:
    """Names of the registered subcommands (the reserved words)."""
    return sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands if c.callback is not None)


def _typed_values(cls: type, values: dict[str, str]) -> dict[str, Any]:
    """Command-line strings, with JSON parsing for keys annotated ``Any``.

    Every other annotated type is coerced by the Config itself ("1.5" -> 1.5).
    """
    import dataclasses

    from machinable.config import config_class, fields_of

    out: dict[str, Any] = {}
    for key, text in values.items():
        annotation: Any = config_class(cls)
        for part in key.split("."):
            fields = fields_of(annotation) if dataclasses.is_dataclass(annotation) else {}
            annotation = fields.get(part, (None, None))[0]
        out[key] = _json_or_text(text) if annotation is Any else text
    return out


def _json_or_text(text: str) -> Any:
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _context_element(spec: ModuleArgs, specs: list[ModuleArgs] | None = None) -> Any:
    from machinable import get
    from machinable.errors import ModuleNotFound, UsageError
    from machinable.experiment import Experiment

    try:
        cls = _element_class(spec.name)
    except ModuleNotFound as e:
        hint = _config_key_hint(spec, specs or [])
        if hint:
            raise ModuleNotFound(f"{e} {hint}") from None
        raise
    if issubclass(cls, Experiment):
        raise UsageError(
            f"{spec.name!r} is an experiment, but only the first module is the experiment; "
            "later modules are executions (or machinable.storage) used as context."
        )
    return get(spec.name, _typed_values(cls, spec.values))


def _config_key_hint(spec: ModuleArgs, specs: list[ModuleArgs]) -> str:
    """For ``machinable mymod lr 0.1``: 'lr' is no module but a config key of mymod."""
    from machinable.config import close_keys, config_class, fields_of

    if spec.values or not specs or spec is specs[0]:
        return ""
    try:
        keys = [k for k in fields_of(config_class(_element_class(specs[0].name)))]
    except Exception:  # the experiment's own errors are reported when it is loaded
        return ""
    close = close_keys(spec.name, keys)
    if not close or close[0].lower() != spec.name.lower():
        return ""
    position = next(i for i, s in enumerate(specs) if s is spec)
    following = specs[position + 1] if position + 1 < len(specs) else None
    value = following.name if following is not None and not following.values else "VALUE"
    return f"{spec.name!r} is a config key of {specs[0].name}: did you mean {close[0]}={value}?"


def _experiments(spec: ModuleArgs, seed: int | None, replicate: int | None, force_new: bool = False) -> tuple[Any, list[Any]]:
    """The experiment the command line names (get-or-create) and those to launch (it, or N replicates)."""
    from machinable import get
    from machinable.errors import UsageError
    from machinable.experiment import Experiment

    cls = _element_class(spec.name)
    if not issubclass(cls, Experiment):
        raise UsageError(
            f"{spec.name!r} is not an experiment ({cls.__name__} is an {getattr(cls, 'kind', 'element')}): "
            "the first module is the experiment, for example machinable estimate_gravity "
            f"{spec.name} key=value."
        )
    values = _typed_values(cls, spec.values)
    experiment = get.new(spec.name, values) if force_new else get(spec.name, values, seed=seed)
    if replicate is None:
        return experiment, [experiment]
    # Idempotent like get(): the same command twice launches the same N
    # replicates (oldest first), resuming unfinished ones instead of adding more.
    existing = [e for e in reversed(experiment.replicates()) if e.code_hash == experiment.code_hash]
    chosen = existing[:replicate]
    while len(chosen) < replicate:
        chosen.append(get.new(spec.name, values))
    return experiment, chosen


def _config_lines(element: Any) -> list[str]:
    """``key = value`` lines of an element's resolved config, defaults marked."""
    import dataclasses

    from machinable.config import config_class, fields_of, flatten, to_json
    from machinable.diff import NON_FINITE

    defaults = flatten(
        {name: to_json(default) for name, (_, default) in fields_of(config_class(type(element))).items() if default is not dataclasses.MISSING}
    )
    values = flatten(element.config_json())
    if not values:
        return ["(no config)"]
    lines = []
    for key, value in values.items():
        mark = "  (default)" if key in defaults and defaults[key] == value else ""
        shown = value if isinstance(value, str) and value in NON_FINITE else repr(value)  # a float NaN/infinity
        lines.append(f"{key} = {shown}{mark}")
    return lines


def _field(label: str, lines: list[str] | str) -> None:
    lines = [lines] if isinstance(lines, str) else lines
    for i, line in enumerate(lines):
        _out(f"{label if i == 0 else '':<13}{line}")


def _describe_state(experiment: Any) -> str:
    state = experiment.state
    return {
        "new": "none yet: --launch creates and runs it",
        "finished": "finished: --launch does nothing",
        "failed": "failed: --launch resumes it in place (same id and seed)",
        "interrupted": "interrupted: --launch resumes it in place (same id and seed)",
        "running": "running now: --launch waits for it",
        "created": "created, never run: --launch runs it",
        "dispatched": "dispatched, not started: --launch runs it",
    }.get(state, state)


def _git_state(require_clean: bool) -> list[str] | None:
    """Dirty files (None outside a repository); raises under --require-clean."""
    from machinable.errors import GitError
    from machinable.git import dirty_files
    from machinable.project import Project
    from machinable.storage import Storage

    dirty = dirty_files(Project.get().path, exclude=[Storage.current().root])
    if require_clean:
        if dirty is None:
            raise GitError(f"Refusing to launch: --require-clean needs a git repository, and {Project.get().path} is not in one.")
        if dirty:
            raise GitError(
                f"Refusing to launch: --require-clean, and the working tree has uncommitted changes in {_files(dirty, 20)}. "
                "Commit them, or launch without --require-clean (the diff is then recorded)."
            )
    return dirty


def _files(paths: list[str], limit: int) -> str:
    shown = ", ".join(paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"{len(paths)} file{'s' if len(paths) != 1 else ''} ({shown}{more})"


def _dry_run(first: Any, experiments: list[Any], execution: Any, require_clean: bool, replicate: int | None, seed: int | None) -> None:
    from machinable.storage import Storage

    dirty = _git_state(require_clean)  # first: --require-clean refuses before anything is printed
    _field("experiment", f"{first.module}  ({_relative(first.project.module_file(first.module))})")
    _field("config", _config_lines(first))
    _field("config hash", first.config_hash)
    _field("code hash", first.code_hash)
    if replicate is None:
        if first.is_committed() or seed is not None:
            _field("id", f"{first.experiment_id}  (seed {first.seed})")
        else:
            _field("id", "new: drawn at launch from a random seed (--seed N fixes it)")
        _field("record", _describe_state(first))
    else:
        rows = []
        for experiment in experiments:
            if experiment.is_committed():
                rows.append(f"{experiment.experiment_id}  seed {experiment.seed}  {experiment.state}")
            else:
                rows.append("new (random seed)")
        existing = sum(1 for e in experiments if e.is_committed())
        _field("replicates", [f"{len(experiments)} requested: {existing} existing, {len(experiments) - existing} new", *rows])
    if execution is not None:
        _field("execution", f"{execution.module}")
        _field("", [f"  {line}" for line in _config_lines(execution)])
    else:
        _field("execution", "machinable.execution.local (default: in this process)")
    _field("storage", str(Storage.current().root))
    if dirty is None:
        _field("git", "not a git repository (records say so)")
    elif dirty:
        _field("git", f"uncommitted changes in {_files(dirty, 5)}: recorded with the experiment")
    else:
        _field("git", "clean")
    _out("Dry run: nothing was executed or stored. Add --launch to run it.")


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _launch(experiments: list[Any], execution: Any, require_clean: bool, wait: bool = False, *,
            verbose: bool = False, replicate: int | None = None) -> None:
    """Launch; for one experiment that finishes, print only its own output
    (like ``experiment.launch()``); ``verbose`` also names each finished one."""
    todo = [e for e in experiments if not e.is_finished()]
    finished = [e for e in experiments if e not in todo]
    if replicate is None and finished:
        e = finished[0]
        _note(f"{e.module} {e.short_id}: already finished, nothing to do ({command_hint(f'show {e.short_id}')})")
    elif finished and not todo:
        _note(f"{len(finished)} of {len(experiments)} replicates already finished: nothing to do for them")
    elif finished:
        _note(f"{len(finished)} of {len(experiments)} replicates already finished; launching the other {len(todo)}")
    if not todo:
        return
    dirty = _git_state(require_clean)
    if dirty and any(not e.is_committed() for e in todo):
        _note(f"Note: uncommitted changes in {_files(dirty, 5)} are recorded with the experiment (git.diff); --require-clean refuses instead.")
    elif dirty:  # stored already (resuming, say): each attempt records the state it runs with
        _note(f"Note: uncommitted changes in {_files(dirty, 5)} are recorded with this attempt (git.diff, or "
              "attempts/N/git.diff if they differ from the state at creation); --require-clean refuses instead.")
    if execution is None:
        from machinable.executions.local import Local

        execution = Local()
    # a failed run raises ExecutionError, whose message is the dispatch report
    with _Progress(todo):
        with execution:
            for experiment in todo:
                experiment.launch()
    report = execution.last_report
    if report is not None and len(todo) == 1:  # many: the execution prints its summary
        if verbose:
            for experiment_id in report.finished:
                _note(f"{todo[0].module} {experiment_id[:12]}: finished ({command_hint(f'show {experiment_id[:12]}')})")
        for experiment_id in report.submitted:
            _note(f"{todo[0].module} {experiment_id[:12]}: submitted ({command_hint('status')} shows its progress)")
    if replicate is not None and report is not None and report.finished and finished:
        new = [i[:12] for i in report.finished]
        shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        _note(f"{len(experiments)} replicates: {len(finished)} already finished, {len(new)} new finished ({shown})")
    if wait and report is not None and report.submitted:
        _wait_for([e for e in todo if e.experiment_id in report.submitted])


def _wait_for(experiments: list[Any]) -> None:
    """``--wait``: block until submitted experiments end; one experiment's output is shown."""
    from machinable.errors import ExecutionError

    _note(f"Waiting for {len(experiments)} submitted experiment{'s' if len(experiments) != 1 else ''} (Ctrl-C stops waiting, not the jobs) ...")
    unfinished = []
    for experiment in experiments:
        experiment.wait()
        if len(experiments) == 1:
            print(experiment.output(), end="", flush=True)
        if experiment.state != "finished":
            reason = (experiment.ledger.last() or {})
            unfinished.append(f"{experiment.short_id}: {experiment.state} "
                              f"({reason.get('error') or reason.get('reason') or 'see ' + command_hint('show ' + experiment.short_id)})")
    if unfinished:
        raise ExecutionError(f"{len(unfinished)} of {len(experiments)} did not finish: " + "; ".join(unfinished))
    _note(f"{len(experiments)} finished.")


class _Progress:
    """Progress of a launch of many experiments, read from their ledgers.

    A rich progress bar on a terminal, one plain line per experiment when
    stderr is piped. Works for any execution (in-process, pool workers,
    subprocesses), since it only watches the storage.
    """

    def __init__(self, experiments: list[Any], interval: float = 0.1) -> None:
        self.experiments = experiments
        self.enabled = len(experiments) > 1
        self.interval = interval
        self._seen: dict[int, int] = {}  # position -> ledger length before the launch
        self._done: set[int] = set()
        self._bar: Any = None
        self._task: Any = None
        self._thread: Any = None
        self._stop: Any = None
        self._lock: Any = None
        self._stderr: Any = None

    def __enter__(self) -> "_Progress":
        if not self.enabled:
            return self
        import threading

        for i, experiment in enumerate(self.experiments):
            self._seen[i] = len(experiment.events()) if experiment.is_committed() else 0
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=sys.stderr)
            self._bar = Progress(
                TextColumn("launching"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, redirect_stdout=sys.stdout.isatty(), redirect_stderr=True, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("launch", total=len(self.experiments))
        else:
            # the execution's closing summary comes after the last experiment's line
            self._stderr = sys.stderr
            sys.stderr = _SummaryAfterProgress(self._stderr, self._poll)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="machinable-progress", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        from machinable.ledger import Ledger
        from machinable.storage import read_lines

        for i, experiment in enumerate(self.experiments):
            if i in self._done:
                continue
            experiment_id = experiment.experiment_id  # read each time: commit may adopt a twin's id
            directory = experiment.storage.directory(experiment_id)
            every = read_lines(directory / "events.jsonl")
            events = every[self._seen[i]:]
            ended = [row["event"] for row in events if row.get("event") in ("finished", "failed")]
            if not ended and Ledger(directory).state(every, check_claim=False) != "finished":
                continue
            self._done.add(i)
            state = ended[-1] if ended else "finished"
            if self._bar is not None:
                self._bar.update(self._task, completed=len(self._done))
            else:
                width = len(str(len(self.experiments)))
                line = f"[{len(self._done):>{width}}/{len(self.experiments)}] {experiment.module} {experiment_id[:12]} {state}\n"
                (self._stderr or sys.stderr).write(line)
                (self._stderr or sys.stderr).flush()

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        self._poll()
        if self._stderr is not None:
            sys.stderr = self._stderr
        if self._bar is not None:
            self._bar.stop()


class _SummaryAfterProgress:
    """stderr while plain progress lines are printed: before a ``machinable: ...``
    summary line of the execution, the progress catches up (so that the summary
    comes after the last ``[N/N]`` line, not before it)."""

    def __init__(self, stream: Any, catch_up: Any) -> None:
        self._stream = stream
        self._catch_up = catch_up

    def write(self, text: str) -> int:
        if text.startswith("machinable: "):
            self._catch_up()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _import_failed(name: str, error: BaseException) -> Exception:
    """Importing a project module raised (a bug in the user's module): one line."""
    import traceback

    from machinable.errors import MachinableError

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" ({_relative(Path(error.filename))}, line {error.lineno})"
    elif frames:
        where = f" ({_relative(Path(frames[-1].filename))}, line {frames[-1].lineno})"
    return MachinableError(f"Importing module {name!r} failed{where}: {type(error).__name__}: {error}")


# --- subcommands -------------------------------------------------------------------------
#
# One function per command, imports inside the function. Each command name is
# a reserved word of the launch grammar. Keep docs/cli.md in sync (the test
# tests/test_cli.py::test_reference_is_in_sync says how to regenerate it).


@app.command(short_help="Create a project from the template, as a git repository.")
def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to create the project (default: the current folder).", show_default=False)] = Path("."),
    git: Annotated[bool, typer.Option("--git/--no-git", help="Make DIR a git repository with an initial commit (unless it is inside one).")] = True,
) -> None:
    """Create a project from the template: example modules, .gitignore, CI workflow.

    Existing files are never overwritten. With git installed, a DIR that is not
    inside a repository becomes one, with the template as its first commit, so
    that the first launch is recorded against a clean commit.
    """
    from machinable.template import write_template

    result = write_template(directory, git=git)
    for line in result.messages:
        _out(line)


# (further subcommands: list, show, diff, status, reproduce, verify, gc, index)


@app.command("status", short_help="Which recorded results are fresh or stale against the current code.")
def status_command(
    modules: Annotated[Optional[list[str]], typer.Argument(metavar="[MODULE]...", help="Only these modules.", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 unless every config has a finished record with the current code (and there is at least one).")] = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="With --check: pass when there are no records at all.")] = False,
    every: Annotated[bool, typer.Option("--all", help="One row per experiment (default: one per config, its newest record).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", metavar="SECONDS", min=0.1, help="Refresh interval of --watch.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Compare each record's code hash with the working tree: fresh or stale.

    Stale rows name the changed files of the module's import closure (comments,
    whitespace and docstrings do not count). Dispatched experiments are
    reconciled with their execution (for example the Slurm queue) first.
    With --check, finding no records fails too, unless --allow-empty.
    """
    import shutil
    import time

    from machinable.errors import MachinableError
    from machinable.reproduce import nothing_to_check, status

    def show() -> Any:
        report = status(modules or None, every=every)
        if as_json:
            import orjson

            _out(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
        elif not (report.empty and check and not allow_empty):  # that case is the error below
            terminal = sys.stdout.isatty()
            if watch and terminal:
                print("\033[2J\033[H", end="")
            _out(report.render(width=shutil.get_terminal_size().columns if terminal else None))
        return report

    if not watch:
        report = show()
        if check and report.empty and not allow_empty:
            raise MachinableError(nothing_to_check(report.nothing_found()))
        if check and not report.ok:
            raise typer.Exit(1)
        return
    try:
        while not _state.get("stdout_closed"):  # nobody reads the refreshes any more
            show()
            time.sleep(interval)
    except KeyboardInterrupt:  # how --watch ends
        return


@app.command("reproduce", short_help="Re-execute recorded experiments in isolation and compare their outputs.")
def reproduce_command(
    targets: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="[ID | MODULE...] [KEY=VALUE]...", help="An experiment id (prefix), or with --all the modules to cover; KEY=VALUE pairs configure --execution.", show_default=False),
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if any output does not reproduce (with --all: or if there is nothing to reproduce).")] = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="With --all --check: pass when there is no finished experiment.")] = False,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance for numbers (result, records, JSON and .npy data).")] = 0.0,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute tolerance for numbers.")] = 0.0,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the worktree and scratch storage for inspection.")] = False,
    compare_output: Annotated[bool, typer.Option("--compare-output", help="Also compare the captured stdout/stderr.")] = False,
    every: Annotated[bool, typer.Option("--all", help="Every finished experiment (of the given modules).")] = False,
    sample: Annotated[Optional[int], typer.Option("--sample", metavar="N", min=1, help="With --all: a random sample of N experiments.", show_default=False)] = None,
    execution: Annotated[Optional[str], typer.Option("--execution", metavar="NAME", help="Run through this execution (e.g. multiprocess processes=4).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Re-execute at the recorded commit + uncommitted diff (a temporary git worktree),
    with the same config and seed, in a scratch storage and a separate process;
    compare result, records, data files (and --compare-output); record the
    attempt in <id>/reproductions/. The original record is never modified.
    """
    from machinable.errors import MachinableError, UsageError
    from machinable.reproduce import missing_storage, nothing_to_check, reproduce, reproduce_all

    names = [t for t in targets or [] if "=" not in t]
    pairs: dict[str, Any] = {}
    if execution:
        from machinable.project import Project
        from machinable.reproduce import resolve_execution

        pairs = parse_module_args([execution, *[t for t in targets or [] if "=" in t]])[0].values
        pairs = _typed_values(resolve_execution(Project.get(), execution)[1], pairs)  # as the launch command types them
    elif any("=" in t for t in targets or []):
        raise UsageError("KEY=VALUE pairs configure an execution: give --execution NAME first (e.g. --execution multiprocess processes=4).")
    options = dict(check=True, rtol=rtol, atol=atol, keep=keep, compare_output=compare_output,
                   execution=execution, execution_config=pairs, echo=not as_json)
    if every:
        reports = reproduce_all(names or None, sample=sample, on_report=None if as_json else (lambda r: _out(r.render())), **options)
    else:
        if sample is not None:
            raise UsageError("--sample N picks experiments for --all: add --all, or give one experiment id.")
        if len(names) != 1:
            raise UsageError(f"Give one experiment id (got {len(names)}: {' '.join(names) or 'none'}), or --all [MODULE...].")
        _check_id(names[0], "every finished experiment of module {name}", "reproduce --all {name}")
        reports = [reproduce(names[0], **options)]
    if as_json:
        import orjson

        _out(orjson.dumps([r.as_json() for r in reports], option=orjson.OPT_INDENT_2).decode())
    elif not every:
        _out(reports[0].render())
    elif reports:
        counts = {v: sum(r.verdict == v for r in reports) for v in ("reproduced", "mismatch", "error")}
        _out(f"{len(reports)} experiment{'s' if len(reports) != 1 else ''}: "
             f"{counts['reproduced']} reproduced, {counts['mismatch']} mismatch, {counts['error']} could not run.")
    if every and not reports:
        from machinable.storage import Storage

        root = Storage.current().root
        of = f" of {', '.join(names)}" if names else ""
        found = f"no finished experiments{of} in {root}" if root.is_dir() else missing_storage(root)
        if check and not allow_empty:
            raise MachinableError(nothing_to_check(found))
        if not as_json:
            _out(f"{found[0].upper()}{found[1:]}: nothing to reproduce.")
    if check and not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command("verify", short_help="Re-check stored records: MANIFEST digests, ledgers, source objects.")
def verify_command(
    ids: Annotated[Optional[list[str]], typer.Argument(metavar="[ID]...", help="Experiment ids or unique prefixes (default: every experiment).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the problems as JSON.")] = False,
) -> None:
    """Re-hash finished records against their MANIFEST and their source objects
    against their digests; check that every stored document parses and every
    ledger agrees with its seal. Lists each problem with its file; exits 1 if
    there is any. Only reads, so it also works on read-only storage.
    """
    from machinable.storage import Storage

    storage = Storage.current()
    checked, problems = storage.verify(ids or None)
    if as_json:
        import orjson

        _out(orjson.dumps({"storage": str(storage.root), "checked": len(checked), "problems": [p.as_json() for p in problems]},
                          option=orjson.OPT_INDENT_2).decode())
    else:
        for problem in problems:
            _out(str(problem))
        damaged = sorted({p.experiment_id for p in problems})
        noun = "experiment" if len(checked) == 1 else "experiments"
        if not checked:
            from machinable.reproduce import missing_storage

            _out(f"Nothing to verify: {missing_storage(storage.root) if not storage.root.is_dir() else f'no experiments in {storage.root}'}.")
        elif problems:
            _out(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {len(damaged)} of {len(checked)} {noun} "
                 f"({storage.root}). A damaged record cannot be repaired: launch its config anew with another seed, "
                 "and `machinable gc --include-finished ID` removes the damaged one.")
        else:
            _out(f"{len(checked)} {noun} intact ({storage.root}).")
    if problems:
        raise typer.Exit(1)


@app.command("gc", short_help="Remove old unfinished experiments, interrupted writes and unreferenced source objects.")
def gc_command(
    ids: Annotated[Optional[list[str]], typer.Argument(metavar="[ID]...", help="Only these experiments (ids or unique prefixes), whatever their age.", show_default=False)] = None,
    older_than: Annotated[str, typer.Option("--older-than", metavar="AGE", help="Unfinished experiments inactive for longer than AGE (30m, 12h, 7d, 2w; 0 for any).")] = "7d",
    include_finished: Annotated[bool, typer.Option("--include-finished", help="Also remove the finished records among the given ids.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Remove unfinished experiments (created, dispatched, failed, interrupted)
    inactive for longer than --older-than, leftovers of interrupted writes, and
    source objects no experiment refers to. Running experiments are never
    removed; a finished record only with --include-finished and its explicit
    id. Run with --dry-run first to see the list.
    """
    from machinable.storage import Storage

    report = Storage.current().gc(older_than, ids=ids or None, include_finished=include_finished, dry_run=dry_run)
    if as_json:
        import orjson

        _out(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        _out(report.render())


# --- inspecting: list (find), show, diff, index ---------------------------------------------


def _check_id(text: str, what: str, command: str) -> None:
    """A module name where an id belongs: say which command does what was meant."""
    from machinable.errors import ExperimentNotFound, MachinableError

    from machinable.project import Project

    word = text.strip()
    if not word or re.fullmatch(r"[0-9a-fA-F]{1,32}", word):
        return  # an id (prefix): Storage.resolve says whether it is stored
    try:
        project = Project.get()
        name = project.normalize_name(word)
        project.module_file(name)
    except MachinableError:
        return  # not a module either: Storage.resolve says what is wrong
    raise ExperimentNotFound(
        f"{word!r} is not an experiment id (ids are hexadecimal: give any unique prefix). "
        f"For {what.format(name=name)}: {command_hint(command.format(name=name))}"
    )


def _list_filters(tokens: list[str]) -> tuple[str | None, dict[str, str]]:
    """``[MODULE] [KEY=VALUE]...`` -> (module, values)."""
    from machinable.errors import UsageError

    module: str | None = None
    values: dict[str, str] = {}
    for token in tokens:
        if "=" in token:
            key, value = token.split("=", 1)
            if not _KEY.match(key):
                raise UsageError(f"Invalid config key {key!r} in {token!r}: use KEY=VALUE with a dotted key such as lr=0.1 or model.depth=3.")
            values[key] = value
        elif module is None and not values:
            from machinable.project import Project

            module = Project.get().normalize_name(token)
        else:
            raise UsageError(f"Unexpected {token!r}: give at most one MODULE, first, then KEY=VALUE pairs.")
    return module, values


def _typed_filters(module: str, values: dict[str, str], storage: Any) -> dict[str, Any]:
    """``list MODULE key=value``: values coerced as a launch would (the Config's
    types, the same errors), so ``use_bn=no`` finds the runs of ``use_bn=no``.

    A key the module's Config no longer has still matches the stored records
    that have it; without an importable module, values match as literals.
    """
    import dataclasses

    from machinable.config import coerce, config_class, fields_of, to_json, unknown_key_error
    from machinable.errors import MachinableError, ModuleNotFound

    try:
        config = config_class(_element_class(module))
    except ModuleNotFound:
        return dict(values)
    except MachinableError as e:  # the module does not import: list what is stored anyway
        _note(f"Note: values match as written ({e})")
        return dict(values)
    out: dict[str, Any] = {}
    for key, text in values.items():
        annotation: Any = config
        path = ""
        for part in key.split("."):
            if not dataclasses.is_dataclass(annotation):
                annotation = None  # inside a dict or Any value: match the literal
                break
            fields = fields_of(annotation)
            if part not in fields:
                if storage.root.is_dir() and storage.fresh_index().has_config_key(key):
                    annotation = None  # a key of older records
                    break
                raise unknown_key_error(part, text, list(fields), where=module, path=path, cls=annotation)
            annotation = fields[part][0]
            path += part + "."
        if annotation is None:
            out[key] = text
            continue
        typed = _json_or_text(text) if annotation is Any else text
        out[key] = to_json(coerce(typed, annotation, key, module))
    return out


def _list_duration(row: dict[str, Any], root: Path | None = None) -> str:
    """How long it ran: the sum of its attempts (a resumed run's idle time between them does not count)."""
    from datetime import datetime, timezone

    from machinable.diff import _duration
    from machinable.index import attempt_durations

    if row["state"] == "running" and root is not None:
        from machinable.storage import read_lines

        try:
            events = read_lines(root / row["id"] / "events.jsonl")
        except OSError:
            return "-"
        known = [s for s in attempt_durations(events, now=datetime.now(timezone.utc)) if s is not None]
        return _duration(sum(known)) if known else "-"
    if row["state"] not in ("finished", "failed") or row.get("duration") is None:
        return "-"
    return _duration(row["duration"])


def _list_time(iso: str | None, seconds: bool = True) -> str:
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(iso).astimezone() if iso else None
    except ValueError:
        return iso or "-"
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") if moment else "-"


def _list_config(row: dict[str, Any], keys: list[str] | None = None) -> str:
    import orjson

    from machinable.config import flatten
    from machinable.diff import _fmt

    try:
        flat = flatten(orjson.loads(row["config"]))
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        return "?"
    shown = [k for k in (keys if keys is not None else flat) if k in flat]
    return " ".join(f"{k}={_fmt(flat[k], 24)}" for k in shown)


def _list_key_columns(rows: list[dict[str, Any]], wanted: list[str], most: int = 6) -> list[str]:
    """The config keys worth a glance: those asked for, then those whose values vary."""
    import orjson

    from machinable.config import flatten

    values: dict[str, set[str]] = {}
    flats = []
    for row in rows:
        try:
            flats.append(flatten(orjson.loads(row["config"])))
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            flats.append({})
    for flat in flats:
        for key in flat:
            values.setdefault(key, set())
    for key in values:
        values[key] = {orjson.dumps(flat.get(key, "\0missing")).decode() for flat in flats}
    varying = [k for k in values if len(values[k]) > 1 and k not in wanted]
    keys = [k for k in wanted if k in values] + varying
    if not keys:
        keys = list(values)
    return keys[:most]


def _list_json(row: dict[str, Any]) -> bytes:
    import orjson

    try:
        config = orjson.loads(row["config"])
    except (orjson.JSONDecodeError, TypeError):
        config = None
    fields = ("id", "module", "state", "seed", "created", "started", "finished", "duration", "execution", "git_commit",
              "config_hash", "code_hash")
    out = {**{k: row.get(k) for k in fields}, "config": config}
    if isinstance(out["seed"], str) and out["seed"].lstrip("-").isdigit():
        out["seed"] = int(out["seed"])
    return orjson.dumps(out) + b"\n"


def _list_nothing_found(storage: Any, module: str | None, values: dict[str, str]) -> None:
    if not storage.root.is_dir():
        _note(f"No experiments: storage {storage.root} does not exist yet.")
        return
    index = storage.fresh_index()
    hints = [f"no experiment has config key {key!r}" for key in values if not index.has_config_key(key)]
    if module and not index.count("module=?", (module,)):
        modules = [r[0] for r in index.db.execute("SELECT DISTINCT module FROM experiments WHERE module != '' ORDER BY module LIMIT 20")]
        hints.append(f"no experiment of module {module!r} (stored: {', '.join(modules) or 'none'})")
    _note(f"No experiments match in {storage.root}" + (f" ({'; '.join(hints)})." if hints else "."))


_STATE_STYLE = {"finished": "green", "failed": "red", "running": "cyan", "interrupted": "yellow", "damaged": "bold red"}


def _list_table(found: Any, wanted: list[str], capped: bool) -> int:
    """Print the matches as a table; returns how many."""
    from rich.console import Console
    from rich.table import Table

    rows = list(found.rows())
    if not rows:
        return 0
    keys = _list_key_columns(rows, wanted)
    modules = {row["module"] for row in rows}
    one_module = len(modules) == 1  # then it goes in the title, leaving the width to the config
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left",
                  title=f"module {next(iter(modules)) or '?'}" if one_module else None)
    columns = ["id", *([] if one_module else ["module"]), "state", "started", "duration", "config"]
    for column in columns:
        if column == "config":
            table.add_column(column, overflow="fold", min_width=12)
        else:
            table.add_column(column, no_wrap=True)
    for row in rows:
        style = _STATE_STYLE.get(row["state"], "")
        state = f"[{style}]{row['state']}[/]" if style else row["state"]
        cells = [row["id"][:12], *([] if one_module else [row["module"] or "?"]), state,
                 _list_time(row["started"] or row["created"], seconds=False), _list_duration(row, found.storage.root),
                 _list_config(row, keys)]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if capped and len(rows) == found.limit:
        total = found.count()
        if total > len(rows):
            console.print(f"[dim]{len(rows)} of {total:,} shown ({found.order} first); --limit N or --no-limit for more.[/]")
    return len(rows)


def _list_experiments(filters: list[str], state: str | None, since: str | None, limit: int | None, oldest: bool,
                      every: bool, as_json: bool) -> None:
    from machinable.storage import Storage

    module, texts = _list_filters(filters)
    storage = Storage.current()
    values = _typed_filters(module, texts, storage) if module and texts else dict(texts)
    terminal = sys.stdout.isatty() and not as_json
    capped = terminal and limit is None and not every
    found = storage.find(module, state=state, since=since, limit=50 if capped else limit,
                         order="oldest" if oldest else "newest", config=values, check_keys=False)  # keys: checked above
    shown = 0
    try:
        if terminal:
            shown = _list_table(found, list(values), capped)
        else:
            out = sys.stdout.buffer
            for row in found.rows():
                if as_json:
                    out.write(_list_json(row))
                else:
                    line = "\t".join([row["id"], row["module"] or "?", row["state"], _list_time(row["started"] or row["created"]),
                                      _list_duration(row, storage.root), _list_config(row)])
                    out.write(line.encode() + b"\n")
                shown += 1
            out.flush()
    except BrokenPipeError:  # `machinable list | head`: the reader has all it wants
        _silence(sys.stdout)
        return
    if not shown and limit != 0:
        _list_nothing_found(storage, module, values)


_LIST_HELP = {
    "filters": "A module, then config values to match (KEY=VALUE, dotted keys for nested configs; 1 matches 1.0).",
    "state": "Only experiments in this state: created, dispatched, running, finished, failed, interrupted, damaged.",
    "since": "Only experiments created since then: 2024-05-01, 2024-05-01T14:30, 30m, 12h, 7d, 2w, today, yesterday.",
    "limit": "At most N experiments (default: all; on a terminal the newest 50, and says how many more there are).",
    "no_limit": "On a terminal too: every match, not only the newest 50.",
}


@app.command("list", short_help="List stored experiments, newest first, by module, config values, state and time.")
def list_command(
    filters: Annotated[Optional[list[str]], typer.Argument(metavar="[MODULE] [KEY=VALUE]...", help=_LIST_HELP["filters"], show_default=False)] = None,
    state: Annotated[Optional[str], typer.Option("--state", metavar="STATE", help=_LIST_HELP["state"], show_default=False)] = None,
    since: Annotated[Optional[str], typer.Option("--since", metavar="WHEN", help=_LIST_HELP["since"], show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", metavar="N", min=0, help=_LIST_HELP["limit"], show_default=False)] = None,
    oldest: Annotated[bool, typer.Option("--oldest", help="Oldest first.")] = False,
    every: Annotated[bool, typer.Option("--no-limit", help=_LIST_HELP["no_limit"])] = False,
    every_alias: Annotated[bool, typer.Option("--all", hidden=True, help="Old name of --no-limit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, streamed (for jq, pandas.read_json(lines=True)).")] = False,
) -> None:
    """List stored experiments from the index (kept in sync with the storage folders).

    On a terminal: a table of id, module, state, start time, duration and the
    config values that vary between the rows shown. Piped: one tab-separated
    line per experiment (id, module, state, started, duration, config), every
    match. `--json`: one JSON object per line. Same as `machinable find`.
    """
    _list_experiments(filters or [], state, since, limit, oldest, every or every_alias, as_json)


# `find` is `list` under another name: one function, so the two never drift apart
app.command("find", short_help="Same as `machinable list`.")(list_command)


@app.command("show", short_help="Everything stored about one experiment: config, code, git, environment, events, outputs.")
def show_command(
    experiment_id: Annotated[str, typer.Argument(metavar="ID", help="An experiment id or any unique prefix of one.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """Show one experiment: its config (defaults marked), the files of its import
    closure with their hashes, git commit/branch/dirty state, environment, the
    events timeline, a summary of its records, its data files, result and the
    tail of its output. Damaged files are shown as damaged.
    """
    from machinable.diff import Snapshot
    from machinable.storage import Storage

    _check_id(experiment_id, "the experiments of module {name}", "list {name}")
    snapshot = Snapshot.of(experiment_id, Storage.current())
    if as_json:
        import orjson

        _out(orjson.dumps(snapshot.as_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    else:
        _out(snapshot.render())


@app.command("diff", short_help="What differs between two experiments, and why their ids differ.")
def diff_command(
    a: Annotated[str, typer.Argument(metavar="A", help="An experiment id or unique prefix.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Another experiment id or unique prefix.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the differences as JSON.")] = False,
) -> None:
    """Compare two experiments section by section, showing only what differs:
    config values; code (changed files of the import closure, with a unified
    diff of their stored sources); git (commits, uncommitted changes);
    environment (python, packages); outputs (result, records statistics, data
    files by digest). The first line says why the ids differ (config keys,
    files, seed).
    """
    from machinable.diff import diff
    from machinable.storage import Storage

    for target in (a, b):
        _check_id(target, "the experiments of module {name}", "list {name}")
    result = diff(a, b, Storage.current())
    if as_json:
        import orjson

        _out(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    else:
        _out(result.render())


@app.command("index", short_help="Bring the storage index up to date, or rebuild it from the folders (--rebuild).")
def index_command(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Delete every row and re-read every experiment folder.")] = False,
) -> None:
    """The index (storage/index.sqlite) only speeds up lookups; the experiment
    folders are the truth. It is brought up to date automatically when the
    folders change behind its back; `--rebuild` recreates it from the folders
    alone (deleting index.sqlite does the same at the next command).
    """
    import time

    from machinable.index import SCHEMA_VERSION, _stderr_progress
    from machinable.storage import Storage

    storage = Storage.current()
    if not storage.root.is_dir():
        _out(f"No storage at {storage.root}: nothing to index.")
        return
    start = time.perf_counter()
    if rebuild:
        progress = _stderr_progress(f"Reading the folders of {storage.root}") if sys.stderr.isatty() else None
        count = storage.rebuild_index(progress=progress)
        _out(f"Rebuilt {storage.index.path} from {count:,} experiment folders in {time.perf_counter() - start:.1f}s.")
        return
    index = storage.index
    added = removed = 0
    if index.fresh_mtime() is None:
        added, removed = index.sync(storage.read_row)
    updated = index.settle(storage.read_row)
    total = index.count()
    changes = f"added {added:,}, removed {removed:,}, updated {updated:,}" if added or removed or updated else "already up to date"
    _out(f"{index.path}: {total:,} experiments (schema {SCHEMA_VERSION}); {changes}.")


# --- entry point -----------------------------------------------------------------------------

_GLOBAL_VALUE_OPTIONS = ("--storage",)
_GLOBAL_FLAGS = ("--debug",)


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move ``--storage PATH`` and ``--debug`` to the front, wherever they were given."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest.extend(argv[i:])
            break
        if token in _GLOBAL_FLAGS:
            front.append(token)
        elif token in _GLOBAL_VALUE_OPTIONS and i + 1 < len(argv):
            front.extend(argv[i:i + 2])
            i += 1
        elif token.split("=", 1)[0] in _GLOBAL_VALUE_OPTIONS and "=" in token:
            front.append(token)
        else:
            rest.append(token)
        i += 1
    return front + rest


def _click() -> Any:
    """The click that typer runs on (newer typer versions vendor their own)."""
    import typer.core

    click = getattr(typer.core, "_click", None)
    if click is None:  # pragma: no cover - typer that depends on the click package
        import click
    import importlib

    importlib.import_module(click.__name__ + ".shell_completion")
    return click


def _with_storage(message: str) -> str:
    """Commands an error message suggests (`machinable show ID`), with --storage PATH where needed."""
    if "`machinable " not in message:
        return message
    try:
        hint = command_hint("")
    except Exception:  # never let the hint hide the error
        return message
    return message.replace("`machinable ", f"`{hint}") if hint != f"{PROG} " else message


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failed run, 2 usage error, 130 interrupted)."""
    from machinable.errors import MachinableError

    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    _state["debug"] = "--debug" in args or os.environ.get("MACHINABLE_DEBUG", "") not in ("", "0")
    _state["stdout_closed"] = False
    click_exceptions = _click().exceptions
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except getattr(click_exceptions, "NoArgsIsHelpError", ()) as e:  # click >= 8.2
        _out(e.format_message())
        return 0
    except click_exceptions.ClickException as e:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        command = e.ctx.command_path if getattr(e, "ctx", None) is not None else PROG
        if getattr(e, "ctx", None) is not None and e.ctx.info_name == SEED_COMMAND:
            command = PROG + " MODULE"
        hint = f" (see '{command} --help')" if isinstance(e, click_exceptions.UsageError) else ""
        _note(f"Error: {e.format_message()}{hint}")
        return e.exit_code
    except typer.Abort:
        _note("Aborted.")
        return 1
    except MachinableError as e:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _note(f"Error: {_with_storage(str(e))}")
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        _note("Interrupted.")
        return 130
    except BrokenPipeError:  # a write not through _out/_note, to a reader that went away: the command stopped part-way
        _silence(sys.stdout)
        return 1
    except Exception as e:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
            _note(f"Error: {type(e).__name__}: {e}")
        else:
            _note(f"Error: {type(e).__name__}: {e} (unexpected: run again with --debug for the traceback, and please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
