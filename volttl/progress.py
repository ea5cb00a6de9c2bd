"""Progress bars that suit where the output goes: tqdm's bar on a terminal; plain lines,
at most one every 30 seconds, when stderr is a pipe or a file (a log), since a bar's
carriage-return frames fill a log with thousands of partial lines."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each refreshed frame into one plain line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, as plain periodic lines when stderr is not a terminal."""
    stream = kwargs.pop("file", sys.stderr)
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        # a log keeps each bar's last line (how far it got), which a terminal clears
        kwargs.update(file=_Lines(stream), ascii=True, dynamic_ncols=False, ncols=100, leave=True)
    else:
        kwargs["file"] = stream
    return tqdm(iterable, **kwargs)
