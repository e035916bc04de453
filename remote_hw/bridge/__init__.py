"""The vfio-user bridge: remote-hw devices for stock QEMU VMs (docs/bridge.md).

remote-hw's own monitor catches a guest's port accesses itself; a stock QEMU does not
hand those to anyone. What it does hand out is a whole PCI function, over vfio-user
(``-device vfio-user-pci``). So the bridge is a vfio-user server that dresses a remote
register model as a PCI device: config space from a template, BAR accesses forwarded
through the native client's link, the model's interrupt line turned into INTx.

Modules, one job each: :mod:`.vfio_user` (the wire protocol, sans-I/O), :mod:`.pci`
(device templates), :mod:`.intx` (the auto-mask rule), :mod:`.front` (sockets and
threads), :mod:`.command` (``remote-hw bridge``), :mod:`.qemu` (running the chroot's
QEMU that has vfio-user-pci).
"""
