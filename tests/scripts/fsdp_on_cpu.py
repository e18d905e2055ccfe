"""Run a training module under FSDP2 on CPU processes: `python fsdp_on_cpu.py MODULE ARGS...`.

accelerate turns FSDP on for GPU processes only and runs CPU processes with DDP; this script tells its state that
the gloo processes are FSDP ones (torch's `fully_shard` runs on CPU with gloo), so that the tests exercise
accelerate's FSDP2 path (sharding, sharded checkpoints, gathering the full state dict) on a machine with no GPU.
"""

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
