"""Imported by a test's `t5lite train --module_import=slow_save_hook`: every checkpoint save
first announces itself on stderr, then waits 120 s, so that a test can deliver a second Ctrl-C
while the run is on its way to saving (the real command, only the save made slow)."""

from __future__ import annotations

import sys
import time

from t5lite import checkpoint

_save = checkpoint.TrainCheckpointer.save


def _slow_save(self, state, data_position, *args, **kwargs):
    print(f"SLOW_SAVE_HOOK: saving batch position {data_position} in 120 s", file=sys.stderr,
          flush=True)
    time.sleep(120)
    return _save(self, state, data_position, *args, **kwargs)


checkpoint.TrainCheckpointer.save = _slow_save
