"""`python -m bench.zygote MOD,MOD,...`: import the modules once, then fork a fresh child per job.

Commands arrive as JSON lines on stdin. A job ({"func", "args", "out"}) is answered with {"pid"}
when its child is forked and {"status"} when the child has exited: the child starts with the
imports already done (so a round does not pay the SDK's import time again) and nothing else (so
each round's peak RSS and CPU time are its own). A spawn ({"spawn": modules, "commands", "channel"})
forks a child that imports more modules and serves as a zygote of its own over two named pipes, so
that, say, batchd's OpenAI-side workers do not import the SDK a second time.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback
from typing import TextIO


def serve(modules: list[str], commands: TextIO, channel: TextIO) -> None:
    for name in modules:
        importlib.import_module(name)
    from . import worker

    gc.collect()
    gc.freeze()  # keep the imported objects out of the children's collections (fewer copied pages)
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in commands:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if "spawn" in command:
                    commands.close()
                    channel.close()
                    with (
                        open(command["commands"], encoding="utf-8") as sub_commands,
                        open(command["channel"], "w", buffering=1, encoding="utf-8") as sub_channel,
                    ):
                        serve(command["spawn"], sub_commands, sub_channel)
                else:
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    worker.execute(command["func"], command["args"], command["out"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        channel.write(json.dumps({"pid": pid}) + "\n")
        if "spawn" not in command:
            _, status = os.waitpid(pid, 0)
            channel.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


def main(argv: list[str]) -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # whatever a job prints goes to the log, not into the protocol
    serve([name for name in (argv[0] if argv else "").split(",") if name], sys.stdin, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
