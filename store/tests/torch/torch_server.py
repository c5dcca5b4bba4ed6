"""torch hosts TCPStores (one per backend named on the command line: libuv, legacy), as torchrun's
agent does, and our Rust client works against them. For each store in turn: torch sets keys,
waits for the Rust side's `rust_done`, then checks what the Rust side wrote."""

import sys

import torch
import torch.distributed as dist

from common import TIMEOUT, check, done, say

stores = {
    backend: dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=TIMEOUT,
        use_libuv=(backend == "libuv"),
    )
    for backend in sys.argv[1:]
}
say("torch", torch.__version__)
for backend, store in stores.items():
    check(f"{backend}_is_{backend}", store.libuvBackend == (backend == "libuv"))
    say("port", backend, store.port)

for backend, store in stores.items():
    store.set("from_py", b"hello")
    store.add("counter", 5)
    store.set("py_added", "1")
    store.wait(["rust_done"])
    check(f"{backend}_from_rust", store.get("from_rust") == b"world")
    check(f"{backend}_counter", store.get("counter") == b"8", store.get("counter"))
    check(f"{backend}_binary", store.get("binary") == bytes([0, 255, 10]))
    check(f"{backend}_append", store.get("log") == b"abcd", store.get("log"))
    check(f"{backend}_cas", store.get("cas") == b"two", store.get("cas"))
    check(f"{backend}_deleted", not store.check(["gone"]))
    check(f"{backend}_multi_set", store.multi_get(["m1", "m2"]) == [b"1", b"22"])
    # Our `with_prefix("/worker/attempt_0")` lands where torch's PrefixStore looks.
    prefixed = dist.PrefixStore("/worker/attempt_0", store)
    check(f"{backend}_prefixed", prefixed.get("rdzv") == b"from-rust")
done()
