"""The `dspark` console script: a thin Typer layer. Commands live in dspark_cli/commands/, one module each,
and only parse options and render events; errors are mapped to one stderr line and an exit code here."""

from __future__ import annotations

import sys

import click
import typer

from . import __version__
from .console import quiet_stdout, say
from .errors import DsparkError

app = typer.Typer(
    name="dspark",
    help="Faster local LLM answers with lossless speculative decoding (a small draft model + a large target).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"dspark {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """dspark: speculative decoding for GGUF models through llama.cpp."""


def _register_commands() -> None:
    # Each command module registers itself; a module that is absent (not yet written) is simply skipped.
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


def _error_line(message: str) -> None:
    say(f"error: {message}")


def main(argv: list[str] | None = None) -> int:
    _register_commands()
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="dspark", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except DsparkError as e:
        _error_line(e.message)
        if e.hint:
            try:
                sys.stderr.write(f"  hint: {e.hint}\n")
            except (OSError, ValueError):
                pass
        code = e.exit_code
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.exceptions.Abort:
        _error_line("interrupted")
        code = 130
    except click.exceptions.ClickException as e:
        e.show()
        code = e.exit_code
    except KeyboardInterrupt:
        _error_line("interrupted")
        code = 130
    except BrokenPipeError:
        quiet_stdout()
        code = 0
    sys.exit(code)


if __name__ == "__main__":  # python -m dspark_cli.cli
    main()
