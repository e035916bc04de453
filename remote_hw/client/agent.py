"""The client agent: VMs, their links to servers, and routing by VM id.

One agent process runs any number of VMs. It keeps one :class:`ServerLink` per
server, shared by all VMs; each mapped guest range becomes a :class:`RemoteDevice` on
the VM's bus. Interrupts and events that arrive on a link carry a VM id and a device
id, and are delivered to exactly that VM's interrupt line. Key events a server's
keyboard publishes go to the VM's virtual keyboards on this host, if it asked for
them (``--uinput``, :mod:`remote_hw.client.key_mirror`), and are dropped otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from remote_hw.client.key_mirror import KeyMirror, VirtualKeyboard, uinput_keyboard
from remote_hw.client.vmm.bus import Bus
from remote_hw.client.vmm.coalesced import CoalescingUnsupported
from remote_hw.client.vmm.vm import Vm
from remote_hw.config import MapSpec, VmConfig
from remote_hw.input.uinput import UinputUnavailable
from remote_hw.net.link import LinkError, ServerLink
from remote_hw.net.security import TlsConfig
from remote_hw.protocol.messages import AccessKind, Direction, Status

# Status of a VM whose guest crashed (the monitor raised VmError; its message, with the
# registers, is in VmHandle.error).
STATUS_CRASHED = 0x200

log = logging.getLogger("remote_hw.client")

_ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
# Plain ints on the hot path: an enum member lookup costs ~70 ns per access.
_READ, _WRITE = int(Direction.READ), int(Direction.WRITE)
_KIND = {"port": AccessKind.PORT, "mmio": AccessKind.MMIO}
_UNREACHABLE = int(Status.UNREACHABLE)



class RemoteDevice:
    """A bus handler that forwards a mapped range's accesses to a server's device.

    When the server cannot answer, the range behaves as a removed device: reads
    return all ones, writes are dropped; the first failure and the recovery are logged.
    The recovery is an access answered again, or, for a guest whose writes are all
    posted and whose reads are all answered from the shadow (a console printing), the
    server confirming it applied a POST made after the failure.
    """

    __slots__ = ("link", "vm_id", "device", "server_id", "target", "kind", "label",
                 "failing", "forwarded", "shadow", "local_reads", "posted", "_mark")

    def __init__(self, link: ServerLink, vm_id: int, spec: MapSpec, target: str = "") -> None:
        self.link = link
        self.vm_id = vm_id
        self.device = spec.device
        self.server_id = spec.server
        # The server id the requests name: "" when the link's server holds the device
        # (or looks it up), the real server's id when reaching it through an entry.
        self.target = target
        self.kind = _KIND[spec.kind]
        self.label = f"vm {vm_id}: {spec.server}/{spec.device}"
        self.failing = False
        self._mark = 0  # POSTs sent when the device failed (see write)
        self.forwarded = 0  # accesses sent to the server (posted writes included)
        # What the server lets this device answer or post without waiting (SHADOW,
        # remote_hw/net/posting.py); stays empty when posting is not negotiated.
        self.shadow = link.shadow_for(vm_id, spec.device)
        self.local_reads = 0  # reads answered from the shadow
        self.posted = 0  # writes sent without waiting

    def read(self, offset: int, size: int) -> int:
        sh = self.shadow
        if size == 1:
            value = sh.reads.get(offset)
            if value is not None:  # the model promised this register holds still
                self.local_reads += 1
                return value
        self.forwarded += 1
        status, value = self.link.io(self.vm_id, self.device, self.kind, offset, size,
                                     _READ, 0, self.target)
        if status:
            self._failed(status)
            return _ALL_ONES[size]
        if sh.sent != sh.confirmed:  # answered in order: every earlier POST is applied
            sh.confirm(sh.sent)
        if self.failing:
            self._recovered()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        sh = self.shadow
        if sh.posted and sh.may_post(offset, size):
            self.forwarded += 1
            self.posted += 1
            if self.link.post(sh, self.kind, offset, size, value, self.target):
                self._failed(_UNREACHABLE)
            elif self.failing:
                # Back when the server confirms a POST made after the failure (the
                # count restarts when the shadow was cleared meanwhile).
                mark = self._mark if self._mark <= sh.sent else 0
                if sh.confirmed > mark:
                    self._recovered()
            return
        self.forwarded += 1
        status, _ = self.link.io(self.vm_id, self.device, self.kind, offset, size,
                                 _WRITE, value, self.target)
        if status:
            self._failed(status)
            return
        if sh.sent != sh.confirmed:
            sh.confirm(sh.sent)
        if self.failing:
            self._recovered()

    def _failed(self, status: int) -> None:
        if not self.failing:
            self.failing = True
            self._mark = self.shadow.sent
            name = Status(status).name if status in Status._value2member_map_ else status
            reason = f" ({self.link.down_reason})" if not self.link.up else ""
            log.error("%s: device unavailable: %s%s; reads return all ones", self.label,
                      name, reason)

    def _recovered(self) -> None:
        self.failing = False
        log.warning("%s: device answers again", self.label)


@dataclass
class VmHandle:
    """A VM the agent runs, with its maps and, once finished, its exit status."""

    config: VmConfig
    vm: Vm
    devices: list[RemoteDevice] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    thread: threading.Thread | None = None
    interrupts: int = 0  # interrupt level changes delivered to this VM


class Agent:
    """Runs VMs whose mapped ranges are served by remote servers."""

    def __init__(self, servers: dict[str, tuple[str, int]], *, timeout: float = 5.0,
                 client_name: str = "agent", vias: dict[str, str] | None = None,
                 tls: TlsConfig | None = None, probes: bool = False,
                 posting: bool = True, coalescing: bool = True,
                 link_factory: Callable[..., ServerLink] = ServerLink,
                 open_keyboard: Callable[[str], VirtualKeyboard] = uinput_keyboard) -> None:
        # server name -> entry server name, for servers reached through another one
        self.vias = dict(vias or {})
        # keyboards of this host re-emitting devices' key events (VmConfig.uinput)
        self.key_mirror = KeyMirror(open_keyboard)
        # (link, vm id, device, line) -> (vm, guest irq): the delivery table for
        # interrupts. The line is the device's own numbering (the i8042: 0 keyboard,
        # 1 mouse), carried by every INTERRUPT.
        self._irq_routes: dict[tuple[str, int, str, int], tuple[VmHandle, int]] = {}
        self.links: dict[str, ServerLink] = {
            # reconnect: a lost server is found again, its session resumed or its
            # devices attached anew (remote_hw/net/recovery.py)
            name: link_factory(name, addr, client_name=client_name, timeout=timeout,
                               on_interrupt=self._interrupt_cb(name),
                               on_event=self._event_cb(name), tls=tls, reconnect=True,
                               posting=posting)
            for name, addr in servers.items()}
        self.vms: dict[int, VmHandle] = {}
        # Posted writes need no exit at all where KVM coalesces them (coalesce()).
        self.coalescing = coalescing
        self._done = threading.Condition()
        self.probes = None
        if probes:  # eBPF probes (docs/ebpf.md): optional, an inert session says why not
            from remote_hw.probes.agent_hook import ProbeSession
            self.probes = ProbeSession.open(optional=True)

    # -- set-up -----------------------------------------------------------------

    def add_vm(self, config: VmConfig) -> VmHandle:
        """Create the VM, load its image and map its ranges (not yet attached)."""
        if config.vm_id in self.vms:
            raise ValueError(f"vm id {config.vm_id} is used twice")
        self._mirror_keys(config)  # first: a host without /dev/uinput says so before KVM
        bus = Bus()
        try:
            vm = Vm(mem_size=config.memory, bus=bus, name=f"vm{config.vm_id}",
                    reset_action="restart" if config.on_reset == "restart" else "exit")
        except BaseException:
            self.key_mirror.remove_vm(config.vm_id)
            raise
        try:
            vm.load_image(config.image)
            handle = VmHandle(config, vm)
            routes: dict[tuple[str, int, str, int], tuple[VmHandle, int]] = {}
            for spec in config.maps:
                link = self.links.get(spec.server)
                target = ""
                if link is None and spec.server in self.vias:
                    link = self.links.get(self.vias[spec.server])
                    target = spec.server
                if link is None:
                    raise ValueError(f"vm {config.vm_id}: no server named {spec.server!r}")
                dev = RemoteDevice(link, config.vm_id, spec, target)
                if spec.kind == "port":
                    bus.map_ports(spec.start, spec.end, dev)
                else:
                    bus.map_mmio(spec.start, spec.end, dev)
                handle.devices.append(dev)
                for line, irq in enumerate(spec.irqs):
                    routes[(link.name, config.vm_id, spec.device, line)] = (handle, irq)
        except BaseException:
            vm.close()
            self.key_mirror.remove_vm(config.vm_id)
            raise
        self._irq_routes.update(routes)
        if self.probes is not None:
            self.probes.publish_vm(vm, config.maps, vm_id=config.vm_id)
        self.vms[config.vm_id] = handle
        return handle

    def _mirror_keys(self, config: VmConfig) -> None:
        """Open a virtual keyboard on this host for each device in ``config.uinput``,
        routed from the link that device's events arrive on (its entry server's, for a
        device reached through another). Raises UinputUnavailable naming the device."""
        for ref in config.uinput:
            link = ref.server if ref.server in self.links else self.vias.get(ref.server, "")
            if link not in self.links:
                self.key_mirror.remove_vm(config.vm_id)
                raise ValueError(f"vm {config.vm_id}: no server named {ref.server!r}")
            try:
                self.key_mirror.add(link, config.vm_id, ref.device, str(ref))
            except UinputUnavailable as e:
                self.key_mirror.remove_vm(config.vm_id)
                raise UinputUnavailable(f"{ref}: {e}") from None

    def connect(self) -> None:
        """Connect every link and attach every mapped device; raises with the reason."""
        for link in self.links.values():
            if not link.up:
                link.connect()
        for handle in self.vms.values():
            for dev in handle.devices:
                status = dev.link.attach(handle.config.vm_id, dev.device, dev.target)
                if status != Status.OK:
                    raise LinkError(f"vm {handle.config.vm_id}: server {dev.server_id} "
                                    f"refused device {dev.device!r}: {Status(status).name}")
            if self.coalescing:
                self.coalesce(handle)

    def coalesce(self, handle: VmHandle) -> int:
        """Let KVM queue the VM's posted writes in its coalesced ring: the registers the
        server said may be posted (SHADOW) take no exit; the vCPU hands them over at
        its next exit, all of one drain in one send. Safe whatever the shadow says
        later: a drained write that may not be posted any more is sent and waited for.
        Returns how many registers; 0 where KVM cannot (its reason is logged)."""
        vm, n = handle.vm, 0
        links: set[ServerLink] = set()
        for dev, spec in zip(handle.devices, handle.config.maps, strict=True):
            kind = "port" if dev.kind == AccessKind.PORT else "mmio"
            posted = dev.shadow.posted
            if not posted:
                continue
            try:
                if not vm.coalescing_supported(kind):
                    log.info("vm %d: KVM does not coalesce %s writes here; posted writes "
                             "still take an exit each", handle.config.vm_id, kind)
                    continue
                for off in range(spec.end - spec.start + 1):
                    if posted >> off & 1:
                        start = spec.start + off
                        (vm.coalesce_ports if kind == "port" else vm.coalesce_mmio)(start, 1)
                        n += 1
            except (OSError, ValueError, CoalescingUnsupported) as e:
                log.warning("vm %d: no coalescing for %s: %s", handle.config.vm_id,
                            dev.label, e)
                continue
            links.add(dev.link)
        for link in links:  # one send per drain
            vm.bus.on_drain(link.uncork, before=link.cork)
        return n

    # -- interrupts and events ------------------------------------------------------

    def _interrupt_cb(self, server: str) -> Callable[[int, str, int, bool, int], None]:
        routes = self._irq_routes
        unrouted: set[tuple[str, int, str, int]] = set()

        def deliver(vm_id: int, device: str, line: int, level: bool, client_id: int) -> None:
            key = (server, vm_id, device, line)
            route = routes.get(key)
            if route is None:
                # Once per line: a busy line must not flood the log. A low level is not
                # worth a word: a resumed session re-sends every line's level, raised
                # or not, and a line nobody routes is low here already.
                if level and key not in unrouted:
                    unrouted.add(key)
                    log.warning("server %s sent an interrupt for vm %d device %s line %d, "
                                "which this agent does not route (no irq for that line in "
                                "--map); dropped", server, vm_id, device, line)
                return
            handle, irq = route
            handle.interrupts += 1
            handle.vm.set_irq(irq, level)
        return deliver

    def _event_cb(self, server: str) -> Callable[[int, str, str, int], None]:
        def deliver(vm_id: int, device: str, name: str, client_id: int) -> None:
            if self.key_mirror.deliver(server, vm_id, device, name):
                return  # a key typed into a server's keyboard (--uinput)
            handle = self.vms.get(vm_id)
            if handle is None:
                log.warning("server %s sent event %s for unknown vm %d", server, name, vm_id)
                return
            log.info("vm %d: %s/%s asks for %s", vm_id, server, device, name)
            # The VM knows what a reset means for it (end or restart, from on_reset).
            handle.vm.device_event(name)
        return deliver

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every VM in its own thread (connect() first)."""
        for handle in self.vms.values():
            t = threading.Thread(target=self._run_vm, args=(handle,),
                                 name=f"vm-{handle.config.vm_id}", daemon=True)
            handle.thread = t
            t.start()

    def _run_vm(self, handle: VmHandle) -> None:
        try:
            handle.status = handle.vm.run()
        except Exception as e:  # a guest crash ends that VM only
            handle.error = str(e)
            handle.status = STATUS_CRASHED
            log.error("vm %d: %s", handle.config.vm_id, e)
        log.info("vm %d finished with status %d", handle.config.vm_id, handle.status)
        with self._done:
            self._done.notify_all()

    def wait(self, timeout: float | None = None) -> dict[int, int | None]:
        """Wait until every VM has finished (or the timeout); returns their statuses."""
        with self._done:
            self._done.wait_for(lambda: all(h.status is not None for h in self.vms.values()),
                                timeout)
        return {vm_id: h.status for vm_id, h in self.vms.items()}

    def stop(self) -> None:
        """Stop VMs that still run, detach, close links, release KVM resources."""
        for handle in self.vms.values():
            if handle.status is None:
                handle.vm.stop(0)
        for handle in self.vms.values():
            if handle.thread is not None:
                handle.thread.join(timeout=5)
        for link in self.links.values():
            if link.up:
                for vm_id in self.vms:
                    link.detach(vm_id)
            link.close()
        self.key_mirror.close()  # after the links: no key event arrives any more
        for handle in self.vms.values():
            devs = handle.devices
            log.info("vm %d: %d accesses forwarded, %d interrupt changes delivered; "
                     "%d writes posted, %d reads answered from shadows",
                     handle.config.vm_id, sum(d.forwarded for d in devs), handle.interrupts,
                     sum(d.posted for d in devs), sum(d.local_reads for d in devs))
            handle.vm.close()
        if self.probes is not None:
            for line in self.probes.vm_lines() + self.probes.report_lines():
                log.info("probes: %s", line)
            self.probes.close()
            self.probes = None
