#!/usr/bin/env python3
"""The vending application's side of the fleetcast sale/install protocol (docs/device.md).

Hold a SHARED flock on the agent's sale lock for the whole of a sale, from the moment the
customer is committed (coin in, card tapped) until the product is out. The agent installs only
while it holds the EXCLUSIVE lock, so an install never starts during a sale and a sale never
starts during an install: with wait=True the sale waits for a running install to end; with
wait=False it is refused at once (UpdateInProgress) and the application can tell the customer.
Any number of sales may hold the lock at once. Closing the file (or the process dying)
releases it, so a crashed application never blocks updates.

    with sale("/var/lib/fleetcast/device/sale.lock", wait=False):
        take_payment()
        dispense()

Run as a program, it serves one pretend customer:
    python3 sale_lock.py [--no-wait] [--ms MILLISECONDS] LOCKFILE
and prints "sale START_NS END_NS" (CLOCK_MONOTONIC, while the lock was held), or exits with
status 75 if --no-wait and an install is running.
"""

import contextlib
import fcntl
import os
import sys
import time

USAGE = "usage: python3 sale_lock.py [--no-wait] [--ms MILLISECONDS] LOCKFILE"


class UpdateInProgress(Exception):
    """An install holds the lock (only with wait=False)."""


@contextlib.contextmanager
def sale(lock_path, wait=True):
    # Never delete or replace the lock file: both sides must lock the same file. The agent
    # creates it when it starts; O_CREAT covers an application that starts first.
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if wait else fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpdateInProgress(lock_path) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def main(args):
    wait, ms = True, 1000
    while len(args) > 1:
        if args[0] == "--no-wait":
            wait, args = False, args[1:]
        elif args[0] == "--ms":
            ms, args = int(args[1]), args[2:]
        else:
            break
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        with sale(args[0], wait=wait):
            start = time.monotonic_ns()
            time.sleep(ms / 1000)
            end = time.monotonic_ns()
    except UpdateInProgress:
        print("refused: the machine is installing an update", file=sys.stderr)
        return 75
    print(f"sale {start} {end}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
