"""torchrun's agent-store layout: torch hosts the store (the agent), a torch rank writes under
`/worker/attempt_0` (what `_create_c10d_store` did before torch 2.4), our prefixed client reads it
and answers, and this script reads the answer and lists the server's keys."""

import torch.distributed as dist

from common import TIMEOUT, check, done, say

agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
say("port", agent.port)
rank = dist.PrefixStore(
    "/worker/attempt_0",
    dist.TCPStore("127.0.0.1", agent.port, is_master=False, timeout=TIMEOUT),
)
rank.set("from_py", "py-rank")
rank.wait(["from_rust"])
check("from_rust", rank.get("from_rust") == b"rust-rank")
keys = sorted(agent.list_keys())
check(
    "layout",
    keys == ["/worker/attempt_0/from_py", "/worker/attempt_0/from_rust"],
    keys,
)
done()
