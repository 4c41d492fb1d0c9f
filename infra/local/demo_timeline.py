"""The demos' timeline: each line stamped with the seconds since the demo began, and waiting with a deadline."""

from __future__ import annotations

import os
import time


class Timeline:
    def __init__(self):
        self.start = time.monotonic()
        self.deadline = self.start + float(os.environ.get("DEMO_TIMEOUT_SECONDS", "900"))

    def say(self, text: str) -> None:
        print(f"{time.monotonic() - self.start:7.1f} s  {text}", flush=True)

    def wait(self, check, what: str):
        """The first truthy answer of `check()`, asked every half second until the demo's deadline."""
        while time.monotonic() < self.deadline:
            found = check()
            if found:
                return found
            time.sleep(0.5)
        raise TimeoutError(what)
