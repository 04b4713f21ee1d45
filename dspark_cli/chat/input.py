"""Reading a chat's messages: a terminal (readline: history, completion of /commands, multi-line input) or
a pipe (one message per line)."""

from __future__ import annotations

import select
import sys
from pathlib import Path

from ..console import err_text
from ..prompt import clean_text

PROMPT = ">>> "
MORE = "... "


def history_path() -> Path:
    from ..places import user_dir

    return user_dir("XDG_STATE_HOME", ".local/state") / "dspark" / "chat_history"


class TerminalInput:
    """readline: arrow-key editing and history (kept across sessions), Tab completes /commands. A line
    ending in a backslash continues on the next; a multi-line paste arrives as one message (bracketed paste
    puts it in one line buffer; without it, the lines already waiting on stdin are joined)."""

    def __init__(self, commands: list[str], history: Path | None = None):
        self.commands = commands
        self.history = history
        self.readline = None
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input() still works
            return
        self.readline = readline
        readline.set_history_length(2000)
        if history is not None:
            try:
                readline.read_history_file(history)
            except OSError:  # no history yet, or an unreadable one: the chat starts with none (not worth a warning)
                pass
        readline.set_completer_delims(" \t\n")
        readline.set_completer(self._complete)
        readline.parse_and_bind("tab: complete")

    def _complete(self, text: str, state: int) -> str | None:
        if self.readline is None or not self.readline.get_line_buffer().startswith("/") or " " in self.readline.get_line_buffer():
            return None
        hits = [c + " " for c in self.commands if c.startswith(text)]
        return hits[state] if state < len(hits) else None

    def read(self) -> str | None:
        """One message, or None at end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt."""
        try:
            lines = [self._input(PROMPT)]
            while True:
                if lines[-1].endswith("\\"):
                    lines[-1] = lines[-1][:-1]
                elif not self._more_waiting():
                    break
                lines.append(self._input(MORE))
        except EOFError:
            return None
        return clean_text("\n".join(lines))

    def line_buffer(self) -> str:
        return self.readline.get_line_buffer() if self.readline is not None else ""

    def _input(self, prompt: str) -> str:
        if sys.stdout.isatty():
            return input(prompt)
        # stdout redirected: keep the prompt out of the answers
        err_text(prompt)
        return input()

    @staticmethod
    def _more_waiting() -> bool:
        try:
            ready, _, _ = select.select([sys.stdin], [], [], 0.0)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def save_history(self) -> None:
        if self.readline is None or self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.history)
        except OSError:  # history is a convenience: a read-only home must not turn leaving the chat into an error
            pass


class PipeInput:
    """stdin is not a terminal: one user turn per line; blank lines are skipped."""

    def read(self) -> str | None:
        while True:
            line = sys.stdin.buffer.readline().decode("utf-8", "replace")  # invalid UTF-8 becomes U+FFFD
            if not line:
                return None
            line = line.rstrip("\r\n")
            if line.strip():
                return line

    def line_buffer(self) -> str:
        return ""

    def save_history(self) -> None:
        pass
