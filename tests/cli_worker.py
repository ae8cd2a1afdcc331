"""A long-lived process that runs `rwkv-convert` command lines in itself, one after another, so that a fuzz test
can try hundreds of files without starting Python and torch for each. Started by tests/test_fuzz_headers.py
under a memory limit; reads one JSON list of arguments per line on stdin and writes one JSON result per line to
the fd named on its command line (native libraries may print on stdout and stderr): {"code": exit code,
"stderr": what the command printed there, "traceback": the text of an exception that escaped the CLI, or
null}."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def run(args: list[str]) -> dict:
    from rwkv_convert.cli import main

    err, out = io.StringIO(), io.StringIO()
    code, trace = 0, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main.main(args=args, prog_name="rwkv-convert", standalone_mode=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - whatever escapes is the finding
            code, trace = 1, traceback.format_exc()
    return {"code": code, "stderr": err.getvalue(), "traceback": trace}


def main() -> None:
    results = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    for line in sys.stdin:
        results.write(json.dumps(run(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
