"""What the scripts beside this one share: a line protocol with the Rust test that runs them.

Each script prints lines of space-separated words on stdout: facts the test needs (`port 1234`),
`ok <check>` or `FAIL <check> <detail>` for each check, and `done` last.
"""

import datetime
import sys

TIMEOUT = datetime.timedelta(seconds=30)


def say(*words):
    print(*words, flush=True)


def check(name, passed, detail=""):
    if passed:
        say("ok", name)
    else:
        say("FAIL", name, repr(detail))


def done():
    say("done")
    sys.stdout.flush()
