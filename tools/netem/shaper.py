#!/usr/bin/env python3
"""A two-TUN link emulator: netem's delay, jitter, loss, rate and reordering in user space.

For kernels built without sch_netem (tools/netem/run.sh picks it only then). Each end of
the link is a TUN device in its own network namespace, opened here from inside that
namespace; every IP packet read from one end is written to the other after the profile's
treatment, per direction, as netem would apply it on that end's egress:

  rate      the packet leaves once the link has serialised everything before it
  delay     then waits DELAY_MS + uniform(-JITTER_MS, JITTER_MS) (so jitter reorders, as
            in netem without a rate)
  reorder   this fraction of packets skips the delay (netem's `reorder P`)
  loss      this fraction is dropped; so is whatever arrives while the link is down
  limit     at most this many packets queued per direction; more are tail-dropped

SIGUSR1 takes the link down (every packet dropped, both ways, no error to either side:
a phone in a tunnel), SIGUSR2 brings it back. SIGTERM or SIGINT stops it. It prints one
line of counters per direction when it stops.

usage: shaper.py --ns-a NS --dev-a DEV --ns-b NS --dev-b DEV
                 [--delay-ms D] [--jitter-ms J] [--loss P] [--rate-kbit R]
                 [--reorder P] [--limit N] [--seed S]
"""

import argparse
import ctypes
import fcntl
import heapq
import os
import random
import selectors
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
# Largest packet read at once: the TUN devices keep the default 1500-byte MTU.
PACKET_SIZE_MAX = 65536
# Longest sleep of the loop, so signals and stop requests are seen promptly.
WAIT_MAX_S = 0.05

libc = ctypes.CDLL(None, use_errno=True)


def setns(name):
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(ns, dev):
    """Attaches to the persistent TUN device `dev` of namespace `ns`."""
    setns(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    """One way of the link: the packets read from `src` go to `dst`."""

    def __init__(self, name, src, dst, args, rng):
        self.name, self.src, self.dst, self.args, self.rng = name, src, dst, args, rng
        self.link_free = 0.0
        self.queue = []  # (due, order, packet)
        self.order = 0
        self.counts = dict(read=0, sent=0, lost=0, down=0, overflow=0, reordered=0)

    def take(self, packet, now, down):
        a = self.args
        self.counts["read"] += 1
        if down:
            self.counts["down"] += 1
            return
        if len(self.queue) >= a.limit:
            self.counts["overflow"] += 1
            return
        if self.rng.random() < a.loss:
            self.counts["lost"] += 1
            return
        leave = now
        if a.rate_kbit > 0:
            leave = max(now, self.link_free) + len(packet) * 8 / (a.rate_kbit * 1000.0)
            self.link_free = leave
        if a.reorder > 0 and self.rng.random() < a.reorder:
            self.counts["reordered"] += 1
            due = leave
        else:
            jitter = self.rng.uniform(-a.jitter_ms, a.jitter_ms) if a.jitter_ms else 0.0
            due = leave + max(0.0, a.delay_ms + jitter) / 1000.0
        self.order += 1
        heapq.heappush(self.queue, (due, self.order, packet))

    def release(self, now, down):
        while self.queue and self.queue[0][0] <= now:
            _, _, packet = heapq.heappop(self.queue)
            if down:
                self.counts["down"] += 1
                continue
            try:
                os.write(self.dst, packet)
                self.counts["sent"] += 1
            except OSError:
                # The far end is administratively down or its queue is full: the packet
                # is gone, as on a wire.
                self.counts["lost"] += 1

    def next_due(self):
        return self.queue[0][0] if self.queue else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns-a", required=True)
    p.add_argument("--dev-a", required=True)
    p.add_argument("--ns-b", required=True)
    p.add_argument("--dev-b", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--rate-kbit", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    fd_a = open_tun(args.ns_a, args.dev_a)
    fd_b = open_tun(args.ns_b, args.dev_b)
    rng = random.Random(args.seed)
    ab = Direction(f"{args.dev_a}->{args.dev_b}", fd_a, fd_b, args, rng)
    ba = Direction(f"{args.dev_b}->{args.dev_a}", fd_b, fd_a, args, rng)

    state = dict(down=False, stop=False)
    signal.signal(signal.SIGUSR1, lambda *_: state.update(down=True))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(down=False))
    signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: state.update(stop=True))

    sel = selectors.DefaultSelector()
    sel.register(fd_a, selectors.EVENT_READ, ab)
    sel.register(fd_b, selectors.EVENT_READ, ba)
    print("shaper ready", flush=True)
    while not state["stop"]:
        now = time.monotonic()
        dues = [d for d in (ab.next_due(), ba.next_due()) if d is not None]
        wait = min([WAIT_MAX_S] + [max(0.0, d - now) for d in dues])
        try:
            ready = sel.select(wait)
        except InterruptedError:
            ready = []
        now = time.monotonic()
        for key, _ in ready:
            direction = key.data
            # A bounded batch per wake-up, so one busy direction cannot starve the other.
            for _ in range(256):
                try:
                    packet = os.read(direction.src, PACKET_SIZE_MAX)
                except BlockingIOError:
                    break
                except OSError:
                    break
                direction.take(packet, now, state["down"])
        for direction in (ab, ba):
            direction.release(now, state["down"])
    for direction in (ab, ba):
        c = direction.counts
        print(f"shaper {direction.name}: " + " ".join(f"{k}={v}" for k, v in c.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
