"""Progress bars and log lines: a widget in JupyterLab, a bar in a terminal, one line per update in a batch log.

Every progress bar of the library comes from :func:`bar`. Interactively it is ``tqdm.auto`` (a widget in
JupyterLab when ``ipywidgets`` is installed, a text bar in a terminal). In a batch run of the notebooks
(``python -m rcp_lib reproduce``) the variable ``$RCP_PROGRESS_LOG`` names a log file: bars then append one plain
line per update (at most one every :data:`LOG_INTERVAL_S` seconds, with the elapsed time and the time left) to that
file, which ``reproduce`` copies to its terminal; nothing of it lands in the executed notebook.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any, Iterable

#: names the batch log file (set by :func:`rcp_lib.reproduce.reproduce` for the notebook kernels)
PROGRESS_LOG_ENV = "RCP_PROGRESS_LOG"
#: seconds between two log lines of one bar in a batch run
LOG_INTERVAL_S = 20.0


class LineLog(io.TextIOBase):
    """A text stream that appends to a file one line per write: tqdm's carriage-return redraws become separate
    lines, blank redraws (a closed bar erasing itself) are dropped."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            text = (self._partial + s).replace("\r", "\n")
            *lines, self._partial = text.split("\n")
            for line in lines:
                if line.strip():
                    self._file.write(line.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._partial.strip():  # tqdm flushes after each redraw: the redraw is a complete line
                self._file.write(self._partial.rstrip() + "\n")
            self._partial = ""
            self._file.flush()

    def close(self) -> None:  # pragma: no cover - closed at interpreter exit
        self.flush()
        self._file.close()
        super().close()


_LOGS: dict[str, LineLog] = {}


def log_stream() -> LineLog | None:
    """The batch log (one :class:`LineLog` per path) when ``$RCP_PROGRESS_LOG`` is set, else None."""
    path = os.environ.get(PROGRESS_LOG_ENV)
    if not path:
        return None
    if path not in _LOGS:
        _LOGS[path] = LineLog(path)
    return _LOGS[path]


def bar(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm progress bar (same arguments as ``tqdm``): ``tqdm.auto`` interactively, a plain bar writing lines to
    the batch log when ``$RCP_PROGRESS_LOG`` is set (see the module docstring)."""
    log = log_stream()
    if log is None:
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    from tqdm.std import tqdm as std_tqdm

    kwargs.update(file=log, ascii=True, ncols=100, dynamic_ncols=False, leave=True)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs["mininterval"] = max(kwargs["mininterval"], LOG_INTERVAL_S)
    return std_tqdm(iterable, **kwargs)
