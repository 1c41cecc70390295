"""Backends for the Ray tests that a CLI cannot name: Ray pickles them to its workers by value.

`GatedBackend` holds any batch holding an image named `*gate*` while its gate file exists (a
driver can be killed with results committed and the run certainly unfinished);
`CrashOnceBackend` kills its worker process on its first batch, once per marker file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from policy_engine.backends.static import StaticBackend, StaticOptions

from policy_engine import Batch, Generation


class GatedOptions(StaticOptions):
    gate: str


class GatedBackend(StaticBackend):
    name = "gated"
    Options = GatedOptions
    options: GatedOptions

    def generate(self, batch: Batch) -> list[Generation]:
        if any("gate" in str(image.source) for image in batch):
            while Path(self.options.gate).exists():  # waits for a condition, not a duration
                time.sleep(0.05)
        return super().generate(batch)


class CrashOnceOptions(StaticOptions):
    marker: str


class CrashOnceBackend(StaticBackend):
    name = "crash-once"
    Options = CrashOnceOptions
    options: CrashOnceOptions

    def generate(self, batch: Batch) -> list[Generation]:
        try:
            fd = os.open(self.options.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().generate(batch)
        os.close(fd)
        os._exit(17)  # the worker process dies mid-batch, as on a segfault or an OOM kill


def register_by_value() -> None:
    """Workers cannot import this test module: ship its classes by value."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
