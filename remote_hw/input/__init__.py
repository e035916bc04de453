"""Input: keys and keyboards, shared by device models, the FUSE view and backends.

A keyboard model on the server, the FUSE ``input``/``keys`` files, the evdev backend
and the client's virtual keyboard all speak one currency, the key event (Linux key
code, pressed), and one contract, :class:`~remote_hw.input.keys.KeySink`. Keeping the
tables, grammars and kernel adapters here, apart from ``devices/`` and ``backends/``,
lets a model use them without depending on a backend, and lets the client use them
without depending on the server.

Pure (no I/O): :mod:`.keys` (codes, names, the sink contract), :mod:`.scancodes`,
:mod:`.layout`, :mod:`.keytext`, :mod:`.linux_events`, :mod:`.device_events`,
:mod:`.hotplug`. Kernel adapters, each failing in one sentence where the kernel or
python-evdev is missing: :mod:`.evdev_keyboard` (read a real keyboard) and
:mod:`.uinput` (write a virtual one).
"""
