"""Running notebooks headless (the notebook tests and scripts/gpu_notebooks.py share this).

poll_in_slices: jupyter_client's reply polls, cut into short slices. Measured here (jupyter_client 8.10,
pyzmq 27.3, ipykernel 7.4 and 6.31 alike): in a process that has imported torch, a cell's execute_reply
was sometimes noticed only when the cell timeout expired (06_dashboard's 20-second run cell waited the full
90 s in 3 of 4 runs, then passed); with the polls sliced, 0 of 2. The missed wake-up is on the client side:
a new poll checks the socket first, so a reply that is already there is seen within a slice.
"""

from __future__ import annotations

import queue
import time


def poll_in_slices(kc, step_s: float = 0.5) -> None:
    """Make the kernel client's shell and iopub reads re-poll every `step_s` (same total timeout)."""
    for channel in (kc.shell_channel, kc.iopub_channel):
        get_msg = channel.get_msg

        async def sliced(timeout=None, _get_msg=get_msg):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                wait = step_s if deadline is None else max(0.0, min(step_s, deadline - time.monotonic()))
                try:
                    return await _get_msg(timeout=wait)
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

        channel.get_msg = sliced
