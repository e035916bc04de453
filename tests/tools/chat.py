"""A scripted TCP conversation, for tests that must talk from inside a namespace.

    python chat.py HOST PORT STEP...   where STEP is expect:TEXT or send:TEXT

TEXT may use Python escapes (\\r, \\n, \\x04). Exits 0 when every expect is met (each
within 20 s), else 1 with what arrived instead.
"""

import socket
import sys
import time

host, port, *steps = sys.argv[1:]
deadline = time.monotonic() + 20
while True:  # the listener appears when the VM attaches its device: retry until then
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
sock.settimeout(0.5)
buf = b""
for step in steps:
    kind, _, text = step.partition(":")
    data = text.encode().decode("unicode_escape").encode("latin-1")
    if kind == "send":
        sock.sendall(data)
        continue
    deadline = time.monotonic() + 20
    while data not in buf:
        if time.monotonic() > deadline:
            print(f"expected {data!r}, got {buf!r}")
            sys.exit(1)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            print(f"closed while expecting {data!r}, got {buf!r}")
            sys.exit(1)
        buf += chunk
    buf = buf[buf.index(data) + len(data):]
print("ok")
