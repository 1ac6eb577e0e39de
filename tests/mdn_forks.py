"""Run many `mdn` command lines fast, each in its own real process.

A server process imports mdn, torch and torchvision once, then forks a child per command line: the
child is the `mdn` process (its own pid, signals, loader workers, exit code) minus the ~2 s of
imports every fresh interpreter pays. The signal sweeps (test_interrupts.py) run about a hundred
commands; this halves their time. Moments before the imports (`start`) need a fresh interpreter.

Protocol, one JSON object a line: the test writes {"args": [...], "env": {...}, "stderr": path};
the server answers {"returncode": int (negative: killed by that signal), "left": [pid, ...]} when
the child has ended. The server is the child's subreaper (Linux), so a process the child left
running (a loader worker it did not stop) becomes the server's own: `left` names them (then ended).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


class Forks:
    """A server (see above) and the command lines run through it, one at a time."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})

    def run(self, args: list, env: dict[str, str], stderr: Path) -> subprocess.CompletedProcess:
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "env": env, "stderr": str(stderr)}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        result = subprocess.CompletedProcess(args, answer["returncode"], "", stderr.read_text(errors="replace"))
        result.left = answer["left"]
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve() -> None:
    import torch  # noqa: F401 - the imports every child would otherwise pay
    import torchvision  # noqa: F401

    import mdn_cli.cli  # noqa: F401
    import mdn_cli.ensemble  # noqa: F401
    import mdn_cli.evaluate  # noqa: F401
    import mdn_cli.export  # noqa: F401
    import mdn_cli.predict  # noqa: F401
    import mdn_cli.train  # noqa: F401

    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of a child become ours
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.environ.update(spec["env"])
                sys.argv = ["mdn", *spec["args"]]
                from mdn_cli.__main__ import main

                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # as the interpreter would show it
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        left = _children()
        for child in left:
            os.kill(child, 9)
            os.waitpid(child, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "left": left}), flush=True)


def _children() -> list[int]:
    """Pids of this process's children still alive (or not yet reaped)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == me:
            found.append(int(stat.parent.name))
    return found


if __name__ == "__main__":
    serve()
