"""Run under `accelerate launch`: each process embeds its slice of a fixed global batch; prints the loss and
the gradient norm that ClipLoss gives with features gathered from all processes."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

from contrastive.model import PRESETS, ContrastiveModel
from contrastive.train import make_loss

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = ContrastiveModel(PRESETS["tiny"])
pixels = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
tokens = model.tokenize([f"a {c} ball" for c in ("red", "blue", "green", "pink", "white", "black", "brown", "gray")])
rank, world = accelerator.process_index, accelerator.num_processes
part = slice(rank * 8 // world, (rank + 1) * 8 // world)
ddp = accelerator.prepare(model)
loss, _ = make_loss()(ddp, {"pixel_values": pixels[part], "tokens": tokens[part]}, 0)
loss.backward()
grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
if world > 1:
    assert dist.is_initialized()
if accelerator.is_main_process:
    result = {"loss": loss.item(), "grad_norm": grad.norm().item(), "world": world}
    Path(sys.argv[1]).write_text(json.dumps(result))
