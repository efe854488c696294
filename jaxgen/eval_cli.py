"""`jaxgen eval ...`: lm-evaluation-harness's own command line (`lm_eval ...`, the same flags) with
the "jaxgen" backend registered (`jaxgen.lm_eval`), e.g.

    jaxgen eval --model jaxgen --model_args model=DIR --tasks arc_easy --num_fewshot 5
"""

from __future__ import annotations

import sys
from typing import List


def run_eval(argv: List[str]) -> int:
    """Runs lm-eval's CLI on argv; returns the exit status (2 with a one-line message when lm-eval
    is not installed)."""
    try:
        import jaxgen.lm_eval  # noqa: F401  (registers the "jaxgen" model)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        sys.stderr.write(f"jaxgen: error: jaxgen eval needs lm-eval (pip install 'jaxgen[eval]'): {exc}\n")
        return 2
    saved = sys.argv
    sys.argv = ["jaxgen eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
