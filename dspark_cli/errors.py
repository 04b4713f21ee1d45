"""Domain errors. Every failure a user can cause is one of these; the CLI maps them to one line on stderr
and an exit code in one place (cli.main), so no traceback ever reaches the terminal for a bad input."""


class DsparkError(Exception):
    """A failure with a message fit for the user. `exit_code` is what the process exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(DsparkError):
    """Impossible flags or arguments (exit 2, like a Typer/Click usage error)."""

    exit_code = 2


class ModelFileError(DsparkError):
    """A model file that is missing, not GGUF, truncated or that llama.cpp refuses."""

    exit_code = 3


class PairError(DsparkError):
    """A draft that cannot pair with the target (vocabularies differ)."""

    exit_code = 4


class PromptError(DsparkError):
    """An empty prompt, or one longer than the context."""

    exit_code = 5


class ContextFullError(PromptError):
    """A prompt longer than the context (the server's code "context_length_exceeded", as OpenAI's)."""


class DownloadError(DsparkError):
    """A download that failed: no network, missing file, gated repo, checksum mismatch, full disk."""

    exit_code = 6


class ResourceError(DsparkError):
    """Not enough memory (RAM or VRAM) for what was asked."""

    exit_code = 7


class OutputError(DsparkError):
    """Output that could not be written: a closed standard output, a full disk, a file that cannot be
    created. Whatever was generated is not silently dropped: the message says what was lost or where it went."""

    exit_code = 8


class RemoteError(DsparkError):
    """An RPC server (`dspark rpc-server`, llama.cpp's rpc-server) that cannot be reached, does not speak the
    protocol, or stops answering mid-generation (exit 9)."""

    exit_code = 9


class Interrupted(DsparkError):
    """Ctrl-C (exit 130). Raised in place of KeyboardInterrupt at the command boundary, because Typer's own
    handling of KeyboardInterrupt differs between its versions (some exit 130 silently, some print "Aborted!")."""

    exit_code = 130


class ReaderGone(Exception):
    """The reader of stdout went away (`dspark ... | head`): stop quietly, exit 0. Stands in for BrokenPipeError
    at the command boundary, which some Typer versions turn into exit 1."""
