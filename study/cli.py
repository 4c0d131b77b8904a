"""One way for every entry point to turn the project's own errors into a message and an exit status.

Use it as the last line of a ``__main__`` module::

    if __name__ == "__main__":
        sys.exit(cli.run(main))

``cli.run`` calls ``main(argv)``; an error the project raises on purpose (a bad
space file, option, config, dataset, results folder, ...) prints
``error: <message>`` on stderr and exits with status 2, or 1 once the command
has started real work (``cli.work_started()``; e.g. a study whose first trials
ran). No traceback, unless ``--debug`` is on the command line or
``COLORIZE_DEBUG=1`` is set; either only adds the traceback, never changes the
exit status. Ctrl-C exits 130 and SIGTERM 143, each with one line. Other
exceptions are bugs and keep their traceback.

Library code raises these errors (with a message naming the input and the fix);
it never prints and exits itself. This module imports neither torch nor Ray:
``analysis`` uses it too, so errors are recognised by the modules that define
them *if those modules were imported* (an error of a module that was never
imported cannot have been raised).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "COLORIZE_DEBUG"

# (module, class name) of project errors that do not derive from ProjectError (their modules stay
# free of this one); looked up lazily so this module imports nothing heavy. New error types
# should derive from ProjectError instead of joining this list.
KNOWN_ERRORS = (
    ("analysis.load", "NotAStudyError"),
)


class ProjectError(Exception):
    """Base of this project's own errors: always shown as a message, never as a traceback."""

    exit_status = 2


class UsageError(ProjectError, ValueError):
    """A command-line option or file that cannot work; the message names it and says what to give instead."""


_state = {"started": False}


def work_started() -> None:
    """From now on an error means work was partly done: the command exits 1 instead of 2."""
    _state["started"] = True


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def project_errors() -> tuple[type[BaseException], ...]:
    """The project's error types among the modules imported so far."""
    found: list[type[BaseException]] = [ProjectError]
    for module, name in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def project_error_in(e: BaseException) -> BaseException | None:
    """``e`` or the project error it wraps (a library such as Ray re-raises a callback's error as its own)."""
    known = project_errors()
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, known):
            return e
        seen.add(id(e))
        e = e.__cause__   # not __context__: an error raised while handling one is a bug of its own
    return None


def check_writable(option: str, folder: Path | str, what: str) -> None:
    """``folder`` is, or can become, a folder this process creates files in (probed; nothing is left).

    Checked up front, so a bad output folder fails before any work; ``option`` names it in the message.
    """
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"{option}: {existing} is a file, not a folder; give a folder for {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{option}: cannot create files in {existing} ({e.strerror}); "
                         f"choose a folder you can write, or fix its permissions") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors in the project's form: one ``error:`` line naming the option
    (not the whole usage text first), exit status 2."""

    def error(self, message: str):   # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_debug(parser) -> None:
    """List ``--debug`` in an entry point's --help (``run`` takes it off the command line first)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (only before a ``--``: what follows belongs to another command)."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != DEBUG_FLAG]
    return head + argv[end:], len(head) != end


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (like KeyboardInterrupt for SIGINT) so cleanup code runs."""


SIGNAL_EXIT = {KeyboardInterrupt: ("interrupted (Ctrl-C)", 130), Terminated: ("terminated (SIGTERM)", 143)}


def _on_sigterm(signum, frame):
    raise Terminated()


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and return its exit status, turning the project's errors into messages.

    ``--debug`` adds the traceback and never changes the status. Ctrl-C exits 130 and SIGTERM 143, each
    with one line (a command's own handlers, installed later, take precedence over SIGTERM's), also when
    the command was started with both blocked."""
    import signal
    import threading

    args, flag = split_debug(sys.argv[1:] if argv is None else argv)
    if flag:
        os.environ[DEBUG_ENV] = "1"   # child processes (Ray workers) see it too
    if not debug_enabled():
        import warnings
        warnings.formatwarning = one_line_warning
    _state["started"] = False
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and hasattr(signal, "pthread_sigmask"):
        # A command stops on Ctrl-C and SIGTERM however it was started: a parent that left them blocked
        # (the mask is inherited) would make it deaf to both. A disposition of "ignore" stays as given.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = main(args)
    except (KeyboardInterrupt, Terminated) as e:
        _show_traceback()
        text, code = SIGNAL_EXIT[type(e)]
        print(text, file=sys.stderr)
        return code
    except BaseException as e:  # noqa: BLE001 - filtered right below; anything else is re-raised
        found = None if isinstance(e, SystemExit) else project_error_in(e)
        if found is None:
            raise
        _show_traceback()
        print(f"error: {message(found)}", file=sys.stderr)
        return 1 if _state["started"] else getattr(found, "exit_status", 2)
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0 if status is None else int(status)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a user reads it: ``warning: <message>``, without the source line that raised it (which
    names the project's code, not the user's input); ``--debug`` keeps Python's own format."""
    return f"warning: {message}\n"


def _show_traceback() -> None:
    if debug_enabled():
        import traceback
        traceback.print_exc()


def message(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__
