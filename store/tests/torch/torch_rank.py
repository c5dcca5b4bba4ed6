"""One torch rank under an agent store that is ours: `init_process_group("gloo")` through env://
(TORCHELASTIC_USE_AGENT_STORE=True, MASTER_ADDR/MASTER_PORT naming our server), an all_reduce
and a barrier."""

import datetime

import torch
import torch.distributed as dist

from common import check, done, say

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
check("all_reduce", value.item() == world * (world + 1) / 2, value.item())
dist.barrier()
say("rank", rank)
dist.destroy_process_group()
done()
