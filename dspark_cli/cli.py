"""The `dspark` console script: a thin Typer layer. Commands live in dspark_cli/commands/, one module each,
and only parse options and render events; every error, a usage error of Typer's click included, is mapped to
one stderr line and an exit code here."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import traceback

import typer

from . import __version__, signals
from .console import closed_at_start, err_text, prepare_streams, quiet_stdout, say, write
from .errors import DsparkError, Interrupted, OutputError, ReaderGone, ResourceError
from .llama import process

app = typer.Typer(
    name="dspark",
    help="Faster local LLM answers with lossless speculative decoding (a small draft model + a large target).",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        write(f"dspark {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """dspark: speculative decoding for GGUF models through llama.cpp."""


# command name -> its module under dspark_cli/commands/, in the order `dspark --help` lists them
COMMANDS = {"run": "run", "chat": "chat", "serve": "serve", "bench": "bench", "models": "models", "pull": "pull",
            "doctor": "doctor", "rpc-server": "rpc_server"}


def _register_commands(args: list[str]) -> None:
    """Register the command args names, or every command when it names none (the help lists them all, and an
    unknown name gets click's own error). One module only, because a process pays for every import at start:
    `bench` alone pulls in numpy, llama.cpp and the engine, 0.2 s before `dspark models` could answer."""
    named = next((a for a in args if not a.startswith("-")), None)
    for name in [named] if named in COMMANDS else COMMANDS:
        importlib.import_module(f".commands.{COMMANDS[name]}", __package__).register(app)
    for info in app.registered_commands:
        info.callback = _guarded(info.callback)


def _guarded(callback):
    """A command whose Ctrl-C and closed pipe leave it as dspark's own exceptions, which Typer passes through
    untouched to main() (Typer's handling of the built-in ones changed between versions)."""

    @functools.wraps(callback)
    def command(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
        except BrokenPipeError:
            raise ReaderGone from None

    return command


def _click_errors(command) -> tuple[type, type, type]:
    """(Exit, Abort, ClickException) of the click that Typer runs on: the `click` package, or the copy Typer
    bundles as `typer._click` since 0.2x (its Exit and Abort live in typer.exceptions). Catching another
    click's classes turned every mistyped flag into a traceback."""
    for klass in type(command).__mro__:
        module = klass.__module__
        if module.endswith(".core") and module != "typer.core":
            core = importlib.import_module(module)
            errors = importlib.import_module(module[: -len("core")] + "exceptions")
            return core.Exit, core.Abort, errors.ClickException
    raise RuntimeError(f"cannot find the click under Typer's {type(command).__name__}")


def _stopped() -> str:
    return "interrupted" if signals.received is None else f"stopped by {signal.Signals(signals.received).name}"


def _error_line(message: str, hint: str | None = None) -> None:
    say(f"error: {message}")
    if hint:
        err_text(f"  hint: {hint}\n")


def main(argv: list[str] | None = None) -> int:
    prepare_streams()
    signals.install()
    process.configure()  # llama.cpp aborts as one line and an exit code, Ctrl-C during loads (llama/process.py)
    for variable in ("COLUMNS", "LINES"):  # Rich draws nothing at all in a width of 0: ignore nonsense sizes
        if not os.environ.get(variable, "80").isdigit() or int(os.environ.get(variable, "80")) < 10:
            os.environ.pop(variable, None)
    if "stdout" in closed_at_start:
        _error_line("standard output is closed, so there is nowhere to write to",
                    hint="redirect it instead: > FILE, or > /dev/null to discard it")
        sys.exit(OutputError.exit_code)
    code = 1
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        _register_commands(args)
        command = typer.main.get_command(app)
        click_exit, click_abort, click_exception = _click_errors(command)
        try:
            # `dspark` alone is `dspark --help` (Typer's no_args_is_help raises an error whose message its
            # newer versions leave empty, having printed the help themselves).
            result = command.main(args=args or ["--help"], prog_name="dspark", standalone_mode=False)
            code = result if isinstance(result, int) else 0
        except click_exit as e:
            code = e.exit_code
        except click_abort:
            _error_line(_stopped())
            code = signals.exit_code()
        except click_exception as e:  # a usage error: click's message as dspark's one line, exit 2
            ctx = getattr(e, "ctx", None)
            _error_line(e.format_message(), hint=f"`{ctx.command_path} -h` lists the {'commands' if ctx.parent is None else 'options'}"
                        if ctx else None)
            code = e.exit_code
    except Interrupted:
        _error_line(_stopped())
        code = signals.exit_code()
    except DsparkError as e:
        _error_line(e.message, e.hint)
        code = e.exit_code
    except KeyboardInterrupt:
        _error_line(_stopped())
        code = signals.exit_code()
    except (BrokenPipeError, ReaderGone):
        quiet_stdout()
        code = 0
    except MemoryError:
        _error_line("out of memory", hint="a smaller model, a smaller --ctx-size, or close other programs")
        code = ResourceError.exit_code
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback only on request
        if os.environ.get("DSPARK_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        _error_line(f"internal error: {type(e).__name__}: {e}",
                    hint="this is a bug in dspark; DSPARK_DEBUG=1 shows the traceback for a report")
        code = 1
    sys.exit(code)


if __name__ == "__main__":  # python -m dspark_cli.cli
    main()
