"""The worker process behind `math_reader`: reads LaTeX with sympy, under the parent's deadline.

Started by `math_reader.MathWorker` as `python -I _math_child.py MEMORY_BYTES`; it imports nothing
from the rft package, only math-verify and latex2sympy2_extended (the parser open-r1 and TRL's
accuracy reward use). sympy can run without end on a short input (`(x+y+z)^{99}` against another
polynomial), and Python cannot interrupt it from another thread, so it runs here, where the
parent can kill it: the parent waits a bounded time for each answer and replaces a worker that
did not answer. Its address space is capped (RLIMIT_AS), so an exact huge integer is a
MemoryError here, not in the training process. It exits when its parent is gone or closes stdin.

Protocol: one JSON object per line. The child first writes `{"ok": true}` when it is ready. Then
per request:
- `{"read": latex}` -> `{"kind": "number", "value": float}` for a finite real number,
  `{"kind": "math"}` for other math (`x^2+1`, an interval, a set, a complex number),
  `{"kind": "infinite"}` for a number that is not finite as a float (`10^{400}`, `\\infty`),
  `{"kind": "unreadable", "error": ...}` when latex2sympy does not parse it as a whole.
- `{"equal": [gold, pred]}` -> `{"equal": bool}`: math-verify's equivalence of two readable texts.
"""

import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time


def _exit_with_parent(parent_pid):
    # A thread, so that it runs while the main thread is inside a long sympy call.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _drop_timeout_warning(record):
    # The signal-based timeout of math-verify is off on purpose: the parent's deadline bounds us.
    return not record.getMessage().startswith("Timeout is disabled")


class Reader:
    """latex2sympy with math-verify's own normalisation (units, `\\left`, `\\dfrac`, `0.5` ...)."""

    def __init__(self):
        from latex2sympy2_extended.latex2sympy2 import latex2sympy
        from latex2sympy2_extended.math_normalization import normalize_latex
        from math_verify import verify
        from math_verify.grader import should_treat_as_complex
        from math_verify.parser import LatexExtractionConfig

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_drop_timeout_warning)
        self._latex2sympy = latex2sympy
        self._normalize = normalize_latex
        self._verify = verify
        self._complex = should_treat_as_complex
        self._config = LatexExtractionConfig().normalization_config

    def parse(self, latex):
        """The sympy expression of the whole text; raises when it does not parse as one."""
        normalized = self._normalize(latex, config=self._config)
        return self._latex2sympy(normalized, is_real=not self._complex(normalized), convert_degrees=False,
                                 normalization_config=None)

    def read(self, latex):
        try:
            expr = self.parse(latex)
        except Exception as exc:  # noqa: BLE001 - antlr and sympy raise many kinds
            return {"kind": "unreadable", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        if not getattr(expr, "is_number", False):
            return {"kind": "math"}
        value = expr.evalf(30)  # mpmath: bounded precision, fast even for 10^{10^{10}}
        if value.is_real is not True:
            if value.is_finite is False or value.has(*_special_values()):
                return {"kind": "infinite"}
            return {"kind": "math"}  # a complex number: compared symbolically
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return {"kind": "infinite"}
        return {"kind": "number", "value": number} if math.isfinite(number) else {"kind": "infinite"}

    def equal(self, gold, pred):
        gold_expr, pred_expr = self.parse(gold), self.parse(pred)
        return bool(self._verify([gold_expr, gold], [pred_expr, pred], timeout_seconds=None))


def _special_values():
    import sympy

    return (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


def _handle(reader, request):
    if "read" in request:
        return reader.read(str(request["read"]))
    gold, pred = request["equal"]
    try:
        return {"equal": reader.equal(str(gold), str(pred))}
    except Exception as exc:  # noqa: BLE001 - what does not parse is not equal
        return {"equal": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def main():
    memory_bytes = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    out = sys.stdout
    reader = Reader()
    out.write(json.dumps({"ok": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = _handle(reader, json.loads(line))
        except MemoryError:
            reply = {"kind": "unreadable", "equal": False, "error": "MemoryError"}
        except RecursionError:
            reply = {"kind": "unreadable", "equal": False, "error": "RecursionError"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
