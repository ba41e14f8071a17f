#!/usr/bin/env python3
"""A slow link for one machine: a TCP proxy from 127.0.0.1:LISTEN to 127.0.0.1:UPSTREAM that
passes what the broker sends on at RATE bytes/s (an idle link saves up at most 16 KiB of
burst) and what the machine sends at once.

    scripts/slowlink_proxy.py LISTEN UPSTREAM RATE

It reads from the broker only as fast as it forwards, through small buffers, so what waits for
the link waits in the broker's socket, as it does behind a slow radio link. A proxy acknowledges
what it has read, which a radio network does not, so the less it holds the truer the model: its
socket's receive buffer is 4 KiB (8 KiB once the kernel doubles it) and its reader stops reading
at 8 KiB. (Before 2026-11-29 asyncio's reader took up to 128 KiB ahead of the link: the broker
saw that much acknowledged that the machine had not received, and sent some of it again when
the machine asked.) Used by scripts/slowlink.sh and scripts/slowfleet.sh."""
import asyncio
import socket
import sys
import time

LISTEN, UPSTREAM, RATE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
SMALL = 16 * 1024
# What the proxy holds of what the broker sends (see the docstring).
HELD = 4 * 1024


async def pipe(r, w, rate=None):
    """Copies r to w; with `rate`, at most that many bytes a second (an idle link saves up at
    most SMALL bytes of burst)."""
    free = time.monotonic()  # when the link is free again
    try:
        while data := await r.read(4096 if rate else 65536):
            w.write(data)
            await w.drain()
            if rate:
                free = max(free, time.monotonic() - SMALL / rate) + len(data) / rate
                wait = free - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def handle(machine_r, machine_w):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HELD)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", UPSTREAM))
    # The reader pauses its transport once it holds more than twice its limit.
    broker_r, broker_w = await asyncio.open_connection(sock=s, limit=HELD)
    machine_w.transport.set_write_buffer_limits(high=SMALL)
    await asyncio.gather(pipe(machine_r, broker_w), pipe(broker_r, machine_w, RATE))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    async with server:
        await server.serve_forever()


asyncio.run(main())
