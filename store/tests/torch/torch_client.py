"""torch's client against our server (its port is argv[1]): every query torch 2.x's TCPStore
client sends, keys the Rust side set before, and a wait the Rust side ends."""

import datetime
import sys
import threading

import torch.distributed as dist

from common import TIMEOUT, check, done, say

store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=TIMEOUT)

check("get_from_rust", store.get("from_rust") == b"rust")
store.set("from_py", b"py")
check("add", store.add("counter", 2) == 2 and store.add("counter", 3) == 5)
check("check", store.check(["from_rust", "from_py"]) and not store.check(["missing"]))

try:
    store.wait(["missing"], datetime.timedelta(milliseconds=200))
    check("wait_times_out", False, "returned")
except Exception as err:  # DistStoreError
    check("wait_times_out", "timeout" in str(err).lower(), str(err))
check("usable_after_timeout", store.get("from_py") == b"py")

check("compare_set_new", store.compare_set("cas", "", "one") == b"one")
check("compare_set_match", store.compare_set("cas", "one", "two") == b"two")
check("compare_set_mismatch", store.compare_set("cas", "zzz", "three") == b"two")
check("compare_set_missing", store.compare_set("no_cas", "x", "y") == b"x")
check("compare_set_missing_not_stored", not store.check(["no_cas"]))

store.append("log", "ab")
store.append("log", "cd")
check("append", store.get("log") == b"abcd")
store.multi_set(["m1", "m2"], ["1", "22"])
check("multi_get", store.multi_get(["m2", "m1"]) == [b"22", b"1"])
store.set("gone", "x")
check("delete_key", store.delete_key("gone") and not store.delete_key("gone"))

store.queue_push("q", "a")
store.queue_push("q", "b")
check("queue_len", store.queue_len("q") == 2)
check("queue_pop", store.queue_pop("q") == b"a" and store.queue_pop("q", block=False) == b"b")
try:
    store.queue_pop("q", block=False)
    check("queue_empty", False, "popped from an empty queue")
except Exception as err:
    check("queue_empty", "empty" in str(err).lower(), str(err))

# A blocking pop woken by a push from another connection.
pusher = store.clone()
popped = []
popper = threading.Thread(target=lambda: popped.append(store.queue_pop("q2")))
popper.start()
pusher.queue_push("q2", "item")
popper.join(10)
check("queue_pop_blocks", popped == [b"item"], popped)

# A barrier of two: this connection and a clone, from two threads.
store.barrier("solo", 1)
other = store.clone()
arrived = []
first = threading.Thread(target=lambda: (other.barrier("pair", 2), arrived.append(1)))
first.start()
store.barrier("pair", 2, datetime.timedelta(seconds=10))
first.join(10)
check("barrier", arrived == [1])

prefixed = dist.PrefixStore("/worker/attempt_0", store)
prefixed.set("rdzv", "from-py")

keys = sorted(store.list_keys())
check("num_keys", store.num_keys() == len(keys), (store.num_keys(), keys))
check("list_keys", "from_rust" in keys and "/worker/attempt_0/rdzv" in keys, keys)

# The Rust side sets `late` once it sees this connection waiting.
say("waiting")
store.wait(["late"])
check("woken_by_rust", store.get("late") == b"set-by-rust")
done()
