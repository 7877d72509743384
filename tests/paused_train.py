"""`vit-train` that pauses once at a known step, so a test's signal lands there.

    python tests/paused_train.py STEP --config ... --workdir ...

When train step STEP + 1 is about to start (STEP steps done, counted from the run's start
or its checkpoint), prints "paused at step STEP" on stdout and waits for a line on stdin.
A signal the test sends meanwhile therefore arrives during step STEP + 1 on any machine,
however fast or loaded; the rest is the real `vit_jax.main`, unchanged.
"""

import runpy
import sys

import jax

from vit_jax.trainer import Trainer

PAUSE_AT = int(sys.argv.pop(1))
_init = Trainer.__init__


def _pausing_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    step_fn = self.train_step

    def train_step(state, batch):
        if int(jax.device_get(state.step)) == PAUSE_AT:
            print(f"paused at step {PAUSE_AT}", flush=True)
            sys.stdin.readline()
        return step_fn(state, batch)

    self.train_step = train_step


Trainer.__init__ = _pausing_init
runpy.run_module("vit_jax.main", run_name="__main__", alter_sys=True)
