"""What every vit_jax command does the same way at its boundary: paths, --help, user errors.

- A path the user types (workdir, checkpoint, dataset folder, output file, data_dir) is
  relative to the directory the command was typed in: `absolute_path` fixes it once, at
  parsing, so that libraries which refuse relative paths (Orbax) and the config a run saves
  never see one. URLs (`gs://...`) pass unchanged.
- `--help` lists the command's own flags with their defaults and exits 0 before JAX or
  TensorFlow is imported: commands import those after parsing.
- On a Linux machine with no accelerator, JAX runs on the CPU without first asking the
  `compile` extra's plugins (libtpu, CUDA) for their devices
  (`accelerators.skip_absent_accelerators`).
- TensorFlow loads without Keras (`skip_keras`; vit_jax uses tf.data alone), and Python's
  garbage collector does not walk the libraries' objects once more at exit
  (`skip_garbage_collection_at_exit`).
- A user error (a bad flag value, a config field that does not exist, a missing file, a
  checkpoint of another model, a path its file system refuses) ends the command with one
  line, `PROG: what was wrong and how to fix it`, on stderr and exit status `USAGE_ERROR`
  (2). A traceback means a bug in vit_jax.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib.util
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags

from vit_jax import accelerators

USAGE_ERROR = 2  # Exit status of every user error, as argparse and the launch scripts use it.
HELP = ("-h", "--help", "--helpshort")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # Where vit_jax's code is.


class UsageError(Exception):
    """The command line asks for something that cannot be done; the message says what to type."""


# Errors whose message is meant for the user: the library raises them for input it refuses.
USER_ERRORS = (
    UsageError,
    accelerators.CpuFallbackError,
    app.UsageError,
    argparse.ArgumentTypeError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def absolute_path(path: str) -> str:
    """`path` made absolute against the current directory (`~` expanded); URLs unchanged.

    Raises:
      argparse.ArgumentTypeError: an empty path (an unset shell variable, say), which would
        name the current directory.
    """
    if not path:
        raise argparse.ArgumentTypeError("an empty path: for the current directory, give '.'")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def positive_int(text: str) -> int:
    """An argparse `type`: a whole number >= 1 (counts, sizes, pixels)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def is_local_file(path: str) -> bool:
    """Whether `path` names an existing local file that is no directory (a URL never does):
    where a directory goes, a path the first write would fail on."""
    return "://" not in path and os.path.exists(path) and not os.path.isdir(path)


def check_directory(flag: str, path: str) -> None:
    """Refuses a local `path` where a command writes a folder and none can be made: the
    path, or a folder above it, is a file.

    Raises:
      UsageError: naming the flag, the path and the file in the way.
    """
    if is_local_file(path):
        raise UsageError(f"{flag} {path} is a file: name a new or existing directory.")
    above = "" if "://" in path else os.path.dirname(path)  # A URL's folders are not local.
    while above != os.path.dirname(above) and not os.path.isdir(above):
        if os.path.exists(above):
            raise UsageError(
                f"{flag} {path} lies under {above}, a file: name a new or existing directory."
            )
        above = os.path.dirname(above)


def absolute_dataset(name: str) -> str:
    """A dataset name with a `folder:DIR` made absolute; tfds and embedded names unchanged."""
    prefix, folder = name.split(":", 1) if name.startswith("folder:") else ("", "")
    return f"{prefix}:{absolute_path(folder)}" if folder else name  # "folder:" stays as typed.


def absolute_config_paths(config: ml_collections.ConfigDict) -> None:
    """Makes a run config's paths absolute in place: data_dir, model_init, folder datasets."""
    for field in ("data_dir", "model_init"):
        if config.get(field):
            config[field] = absolute_path(config[field])
    config.dataset = absolute_dataset(config.dataset)
    for name, (dataset, *splits) in config.fewshot.datasets.items():
        config.fewshot.datasets[name] = (absolute_dataset(dataset), *splits)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        if isinstance(default, tuple | list):
            return f"{text} (default: {','.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this module's conventions: defaults in --help, errors on one line."""

    def __init__(self, prog: str | None = None, doc: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("description", doc)
        super().__init__(prog=prog, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def skip_keras() -> None:
    """Keeps TensorFlow from importing Keras as it loads: 1.8 of the 5.3 s `import
    tensorflow` took on a 2-core CPU (Keras 3 imports matplotlib and scikit-learn), in every
    command that reads images. TensorFlow imports `keras.src.optimizers` at load time for
    its SavedModel registry; with TF_USE_LEGACY_KERAS set it looks for the `tf_keras`
    package instead and goes on without it when it is absent. The variable changes only what
    `tf.keras` names, which vit_jax never uses. A value the user set is kept, and none is set
    where `tf_keras` is installed (TensorFlow would load it instead)."""
    if "TF_USE_LEGACY_KERAS" in os.environ or importlib.util.find_spec("tf_keras") is not None:
        return
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def skip_garbage_collection_at_exit() -> None:
    """Hands the objects a command leaves at exit back to the OS with its process, instead of
    having Python's garbage collector walk them first: `gc.freeze` as an atexit handler.

    Interpreter finalization runs full collections after the command's work is done, each
    walking every object the collector tracks: ~400,000 once TensorFlow and JAX are loaded,
    0.7 s of a 12-step tiny `vit-train`'s 12 s on a 2-core CPU. Frozen objects are not
    walked. The other atexit handlers (logging's flush, JAX's distributed shutdown) run as
    before, and every file a command writes is closed before it returns, so none waits for
    a collection to be flushed. Collections while the command runs are Python's default: ten
    times fewer full ones saved 0.6 s of loading the libraries, but made in-process tracing
    and compiling 5-11% slower (the tests of models, train steps and shardings)."""
    atexit.unregister(gc.freeze)  # Once per process, however often a command runs in it.
    atexit.register(gc.freeze)


def run(prog: str, body: Callable[[], int | None], memory_lever: str | None = None) -> int:
    """`body()`'s exit status, or `USAGE_ERROR` after one line on stderr for a user error.

    A ValueError counts as one only when vit_jax raised it (on purpose, with its message);
    one from inside a library (JAX, NumPy, ...) is a bug and keeps its traceback. With a
    `memory_lever` (what makes the command's forward pass smaller, e.g. "a smaller
    --batch_size (now 32)"), a forward pass that does not fit in device memory ends the
    command with one line naming it, and status 1. JAX's platforms are chosen first
    (`accelerators.skip_absent_accelerators`), TensorFlow is kept from importing Keras
    (`skip_keras`), and the garbage collector from walking both libraries' objects at exit
    (`skip_garbage_collection_at_exit`).
    """
    accelerators.skip_absent_accelerators()
    skip_keras()
    skip_garbage_collection_at_exit()
    try:
        return body() or 0
    except USER_ERRORS as e:
        if isinstance(e, ValueError) and not _raised_here(e):
            raise
        print(f"{prog}: {_message(e)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as e:
        if (refusal := _file_system_refusal(e)) is not None:
            print(f"{prog}: {refusal}", file=sys.stderr)
            return USAGE_ERROR
        # JAX's errors (JaxRuntimeError) are RuntimeErrors.
        if memory_lever is None or not isinstance(e, RuntimeError):
            raise
        from vit_jax.trainer import device_memory_refusal  # JAX is loaded by now.

        if (refusal := device_memory_refusal(e)) is None:
            raise
        print(
            f"{prog}: the forward pass does not fit in device memory ({refusal.rstrip('.')}). "
            f"To fit: {memory_lever}.",
            file=sys.stderr,
        )
        return 1


# TensorFlow's file I/O (`tf.io.gfile`), which reads and writes the paths a user names.
_TF_FILE_IO = os.path.join("tensorflow", "python", "lib", "io", "file_io.py")


def _file_system_refusal(error: BaseException) -> str | None:
    """One line for an error TensorFlow's file I/O raised on a path, or one a library raised
    from it (tfds opening a `data_dir`): a bucket misspelt or out of this machine's reach
    or rights, a scheme TensorFlow has no file system for. The path is the user's to fix,
    not a bug in vit_jax. None for any other error."""
    cause: BaseException | None = error
    while cause is not None and not _from_tf_file_io(cause):
        cause = cause.__cause__
    if cause is None:
        return None
    reason = " ".join(line.strip() for line in _message(error).splitlines() if line.strip())
    return (
        f"{reason.rstrip('.')}. Check the path; on gs:// also that the bucket exists and that "
        "this machine reaches it with credentials that may use it (`gcloud storage ls` it "
        "from here)."
    )


def _from_tf_file_io(error: BaseException) -> bool:
    return type(error).__module__.startswith("tensorflow.") and any(
        f.filename.endswith(_TF_FILE_IO) for f in traceback.extract_tb(error.__traceback__)
    )


def _raised_here(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is vit_jax's code."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def error_line(error: Exception) -> str:
    """An error's first line, without the op and function names TensorFlow puts around it
    (in {{...}} and [Op:...]), which are not the user's concern."""
    lines = str(getattr(error, "message", error)).strip().splitlines()
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", lines[0] if lines else "")


def error_summary(error: Exception) -> str:
    """`error_line` with the error's type, short: TensorStore errors carry pages of spec."""
    return f"{type(error).__name__}: {error_line(error)[:300]}"


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip() or type(error).__name__


def run_with_flags(
    prog: str,
    doc: str,
    main: Callable[[list[str]], int | None],
    finish: Callable[[int], int] = int,
) -> NoReturn:
    """Parses absl flags (`--config` recipes included) and exits with `main(rest)`'s status.

    `--help` prints `doc` and the flags the calling module defines, with their defaults.
    `--config.KEY=None` sets a field whose default is None to None (`_set_none`). Flag
    errors (unknown flag, bad value, a `--config.KEY` the recipe lacks, a recipe that fails
    to load, None for a field that needs a value) are user errors. `finish(status)` is the
    exit status, whichever way `main` ended: its status, a user error's, or a bug's (1,
    after its traceback).
    """
    module = sys._getframe(1).f_globals["__name__"]  # The command's module defines its flags.
    if any(arg in HELP for arg in sys.argv[1:]):
        print(f"{doc.strip()}\n\nflags:\n{_flags_help(module)}")
        sys.exit(0)

    try:
        status = run(prog, lambda: main(parse_flags(module)))
    except Exception:  # A bug: its traceback and status, as Python's own exit gives them.
        traceback.print_exc()
        status = 1
    sys.exit(finish(status))


def parse_flags(module: str) -> list[str]:
    """Parses `sys.argv` into absl's flags, those of the command whose flags `module`
    defines, and returns the arguments that are not flags: what `run_with_flags` does
    before the command's body runs. (ml_collections finds a recipe's `--config.KEY=VALUE`
    overrides in `sys.argv` itself.)

    Raises:
      UsageError: an unknown flag, a bad value, a `--config.KEY` the recipe lacks, a recipe
        that fails to load, None for a field that needs a value.
    """
    argv = list(sys.argv)
    parsed, nones = _without_none_overrides(argv, module)
    try:
        rest = flags.FLAGS(parsed)
    except flags.Error as e:
        raise UsageError(_flag_error(str(e))) from None
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.KEY not in the recipe.
        raise UsageError(_unknown_field(e, argv)) from None
    except OSError as e:  # A --config.KEY applied to a recipe that failed to load.
        raise _recipe_not_loaded("config", e) from None
    _check_recipes(module)
    for flag, key in nones:
        _set_none(flag, key, argv)
    return rest


# `--config.KEY=VALUE` as ml_collections reads it: VALUE is parsed by the field's type.
_OVERRIDE = re.compile(r"--(\w+)\.([\w.]+)=(.*)", re.DOTALL)


def _without_none_overrides(
    argv: Sequence[str], module: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """`argv` without its `--FLAG.KEY=None` arguments for the module's config flags, and
    those as (FLAG, KEY) where None is the last value given for the field.

    ml_collections parses an override by the field's type, so "None" was an error for an
    int field and the string "None" for a str field: a field whose default is None could
    not be given None again once a recipe set it (`_set_none` does, after parsing).
    """
    module_flags = flags.FLAGS.get_flags_for_module(module)
    names = {f.name for f in module_flags if f.flag_type() == "config object"}
    rest, nones = [], []
    for arg in argv:
        found = _OVERRIDE.fullmatch(arg)
        if found and found[1] in names:
            nones = [n for n in nones if n != (found[1], found[2])]  # The last value wins.
            if found[3] == "None":
                nones.append((found[1], found[2]))
                continue
        rest.append(arg)
    return rest, nones


def _set_none(flag: str, key: str, argv: Sequence[str]) -> None:
    """Sets `--FLAG.KEY=None` on the parsed recipe, for a field whose default in
    vit_jax/config.py is None; raises UsageError for a field the recipe lacks or one that
    needs a value."""
    *parents, leaf = key.split(".")
    try:
        holder = flags.FLAGS[flag].value
        for name in parents:
            holder = getattr(holder, name)
        getattr(holder, leaf)
    except AttributeError as e:
        raise UsageError(_unknown_field(e, argv)) from None
    if not _default_is_none(key):
        raise UsageError(
            f"--{flag}.{key}=None: {key} needs a value (None is for the fields whose "
            "default is None in vit_jax/config.py)."
        )
    setattr(holder, leaf, None)


def _default_is_none(key: str) -> bool:
    """Whether the field `key` ("model.representation_size") defaults to None in
    vit_jax/config.py."""
    from vit_jax.config import field_default  # vit_jax.config imports this module.

    try:
        return field_default(key) is None
    except KeyError:
        return False


def _flags_help(module: str) -> str:
    entries = []
    for flag in flags.FLAGS.get_flags_for_module(module):
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        default = "" if flag.default in (None, False) else f" (default: {flag.default})"
        entries.append((name, flag.help + default))
        if flag.flag_type() == "config object":
            entries.append(
                (
                    f"--{flag.name}.KEY=VALUE",
                    "Overrides one field of the recipe, e.g. --config.batch_size=64 "
                    "(vit_jax/config.py lists every field with its default); None gives "
                    "a field whose default is None that default again, e.g. "
                    "--config.model.representation_size=None.",
                )
            )
    return "\n".join(
        f"  {name}\n" + textwrap.fill(text, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for name, text in entries
    )


def _check_recipes(module: str) -> None:
    """A recipe file that failed to load (missing, or raising) as a user error now."""
    for flag in flags.FLAGS.get_flags_for_module(module):
        if flag.flag_type() == "config object" and flag.value is not None:
            try:
                flag.value.keys()  # ml_collections defers the error to the first access.
            except OSError as e:
                raise _recipe_not_loaded(flag.name, e) from None


def _recipe_not_loaded(flag: str, error: OSError) -> UsageError:
    reason = str(error).strip().splitlines()[-1].strip()
    return UsageError(f"--{flag}: cannot load the recipe: {reason}")


def _flag_error(text: str) -> str:
    """absl's message, shortened to its last line when it wraps a recipe's traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    flag = lines[0].split(": ", 1)[0]  # "flag --config=FILE:ARGS"
    reason = re.sub(r"^\w+(Error|Exception): ", "", lines[-1].strip())
    return f"{flag}: {reason}"


def _unknown_field(error: BaseException, argv: Sequence[str]) -> str:
    """The message for a `--config.KEY=VALUE` whose KEY the recipe lacks, naming the flag."""
    reason = _message(error.__context__ if isinstance(error, AttributeError) else error)
    name, _, hint = reason.partition("\n")
    key = name.strip("'\"")
    typed = [a.split("=", 1)[0] for a in argv if key in a.split("=", 1)[0].split(".")[1:]]
    where = f"{typed[0]}: " if typed else ""
    return f"{where}the recipe has no field {name}. {hint}".strip()
