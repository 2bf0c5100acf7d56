# usage: flood.py PORT N FIRST_HOST LAST_HOST SECONDS
# Keeps N connections open to 127.0.0.1:PORT that never say Hello (half send three bytes
# of a header), spread over source addresses 127.0.0.FIRST..LAST; reopens any the node
# closes. Prints how many were open and how many reopened.
import resource, selectors, socket, sys, time, errno
port, n, first, last, seconds = map(int, sys.argv[1:6])
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
sel = selectors.DefaultSelector()
hosts = [f"127.0.0.{h}" for h in range(first, last + 1)]
opened = 0
reopened = 0
def open_one(i):
    global opened
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((hosts[i % len(hosts)], 0))
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_WRITE, (i, 0))
    opened += 1
for i in range(n):
    open_one(i)
end = time.time() + seconds
last_report = 0
while time.time() < end:
    for key, ev in sel.select(timeout=0.5):
        s = key.fileobj; i, state = key.data
        if state == 0:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0 and i % 2 == 1:
                try: s.send(b"\x20\x00\x00")
                except OSError: pass
            sel.modify(s, selectors.EVENT_READ, (i, 1))
            if err != 0:
                sel.unregister(s); s.close(); reopened += 1; open_one(i)
        else:
            try: data = s.recv(4096)
            except OSError: data = b""
            if not data:
                sel.unregister(s); s.close(); reopened += 1; open_one(i)
    if time.time() - last_report > 5:
        last_report = time.time()
        print(f"flood: {len(sel.get_map())} open, {reopened} reopened", flush=True)
