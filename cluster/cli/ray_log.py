"""Keep Ray's own messages out of a command's output: they go to a log file unless -v.

Ray writes to the driver's stderr from Python (its `ray` loggers: "Started a local Ray
instance", Ray Data's execution lines) and from C++ (the core worker's `[... E ...] core_worker.cc`
lines), which no Python setting reaches. So stderr itself (file descriptor 2) is passed through a
pipe: lines in Ray's two formats go to the log file, every other line (the project's own, and
tracebacks) to the terminal as before.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

# "2026-12-01 22:45:38,740\tINFO worker.py:2038 -- ...", "[2026-12-01 22:45:51,018 E 8393 8393] core_worker.cc:...",
# lines Ray forwards from its processes, "(raylet) ..." / "(ServeController pid=21548) ..." (maybe in colour),
# and Serve's "INFO 2026-12-02 06:05:16,006 serve 20617 -- ...".
RAY_LINE = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- "
                      rb"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] "
                      rb"|(\x1b\[[\d;]*m)?\((raylet|[\w:.-]+ pid=\d+)[^)]*\)(\x1b\[0m)? "
                      rb"|(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ \d+ -- )")


def log_path(command: str) -> Path:
    from stages.demo import default_model_dir

    logs = default_model_dir().parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def ray_output_to_log(command: str, verbose: bool, fds: tuple[int, ...] = (2,)) -> Iterator[Path | None]:
    """While inside, Ray's lines on stderr (and on the other file descriptors of `fds`: Ray prints
    some of its processes' errors, "(raylet) ...", on stdout) go to a log file (yielded; None with
    verbose)."""
    if verbose:
        yield None
        return
    path = log_path(command)
    hidden = threading.Event()
    saved, threads = {}, []

    def pump(read_end: int, terminal: int) -> None:
        with os.fdopen(read_end, "rb") as pipe, open(path, "ab") as log_file:
            for line in pipe:
                if RAY_LINE.match(line):
                    log_file.write(line)
                    log_file.flush()
                    hidden.set()
                else:
                    os.write(terminal, line)

    sys.stdout.flush()
    sys.stderr.flush()
    for fd in fds:
        read_end, write_end = os.pipe()
        saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        threads.append(threading.Thread(target=pump, args=(read_end, saved[fd]), name=f"ray-log-{fd}", daemon=True))
        threads[-1].start()
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, terminal in saved.items():
            os.dup2(terminal, fd)  # processes Ray started may still hold the pipe; the pump ends with them
        for thread in threads:
            thread.join(timeout=1)
        if hidden.is_set():
            print(f"(Ray's messages are in {path}; -v shows them)", file=sys.stderr)
        for thread, terminal in zip(threads, saved.values()):
            if not thread.is_alive():
                os.close(terminal)
