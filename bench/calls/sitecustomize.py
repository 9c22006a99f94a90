"""Loaded by `bench.cpu` into the API it measures (this folder first on its PYTHONPATH): counts the Python
functions the API's main thread calls between SIGUSR1 and SIGUSR2, and writes the count to $HAL0_BENCH_CALLS.

The profile function is installed at start and counts only while on: one installed from a signal handler under
Python 3.11 does not reach frames that are already running (the event loop's).
"""

import os

if os.environ.get("HAL0_BENCH_CALLS") and os.environ.get("HAL0_HOME"):
    import collections
    import json
    import signal
    import sys

    _on = [False]
    _counts: collections.Counter[str] = collections.Counter()

    def _profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if _on[0]:
            if event == "call":
                _counts["python"] += 1
                code = frame.f_code
                _counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
            elif event == "c_call":
                _counts["c"] += 1

    def _start(*_):  # type: ignore[no-untyped-def]
        _counts.clear()
        _on[0] = True

    def _stop(*_):  # type: ignore[no-untyped-def]
        _on[0] = False
        with open(os.environ["HAL0_BENCH_CALLS"], "w") as fh:
            json.dump(_counts.most_common(60), fh)

    sys.setprofile(_profile)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
