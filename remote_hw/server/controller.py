"""The server's controller: device registry, per-session instances, feedback.

The controller knows nothing about sockets. The network layer hands it requests with
the *authenticated* client id of the connection they came on, and gives it a
:class:`SessionSink` per client through which interrupts and device events leave.

Instances: each (client, VM) that attaches a device gets its own instance (its own
register state and its own backend), unless the device is configured ``shared``, in
which case every attached VM talks to one instance and all of them receive its
interrupts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from remote_hw.backends.base import Backend, BackendError, KeyBackend, StreamBackend
from remote_hw.backends.registry import backend_class, check_backend, open_backend
from remote_hw.config import DeviceSpec
from remote_hw.devices.base import Device, RegisterShadow, StreamDevice
from remote_hw.devices.capabilities import ByteStream
from remote_hw.devices.registry import create_device, device_class
from remote_hw.input.keys import KeySink
from remote_hw.protocol.messages import Direction, Status
from remote_hw.server.limits import QuotaExceeded

log = logging.getLogger("remote_hw.server")

# The hot path's constants as plain ints (an enum member lookup costs ~70 ns each).
_OK, _UNKNOWN_DEVICE, _NOT_ATTACHED, _BAD_ACCESS, _DEVICE_ERROR = (
    int(Status.OK), int(Status.UNKNOWN_DEVICE), int(Status.NOT_ATTACHED),
    int(Status.BAD_ACCESS), int(Status.DEVICE_ERROR))
_WRITE = int(Direction.WRITE)

SessionKey = tuple[int, int]  # (client id, vm id)
OutputListener = Callable[[bytes], None]  # called with bytes the guest transmitted


class SessionSink(Protocol):
    """Where a client's interrupts and events go (implemented by the network layer)."""

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None: ...

    def event(self, vm_id: int, device: str, name: str) -> None: ...


class ShadowSink(Protocol):
    """A session that takes shadows (it negotiated POSTED): see :meth:`Instance.refresh_shadow`."""

    def wants_shadow(self) -> bool: ...

    def shadow(self, vm_id: int, device: str, shadow: RegisterShadow | None) -> None: ...


def interrupt_vms(sink: Any, vm_ids: tuple[int, ...], device: str, line: int,
                  level: bool) -> None:
    """A line change for several VMs of one sink. A sink that takes several at once (a
    session: ``interrupt_vms``) gets them in one call: a shared device's edge to a
    client's 100 VMs is one call and one encode of 100 frames, not 100 of each, with
    the device's lock held. Any other sink gets one ``interrupt`` per VM."""
    many = getattr(sink, "interrupt_vms", None)
    if many is not None:
        many(vm_ids, device, line, level)
    else:
        for vm_id in vm_ids:
            sink.interrupt(vm_id, device, line, level)


class _InstanceIrq:
    """The interrupt line handed to a model: fans level changes out to attached VMs."""

    __slots__ = ("instance", "line", "level")

    def __init__(self, instance: Instance, line: int) -> None:
        self.instance = instance
        self.line = line
        self.level = False

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level == self.level:
            return  # models may repeat a level; only changes travel
        self.level = level
        self.instance.irq_changes += 1
        if self.instance.shadow_sinks:
            # The shadow first: a guest's handler that reads a shadowed register (LSR)
            # must find it as the model has it when the interrupt arrives.
            self.instance.refresh_shadow()
        device, line = self.instance.spec.id, self.line
        for sink, vms in self.instance.fanout():
            interrupt_vms(sink, vms, device, line, level)


@dataclass(eq=False)
class Instance:
    """One live instance of a software device: model, lock, backend, sessions.

    A stream model's output is published by the instance: the model's ``tx_sink`` is
    :meth:`from_guest`, which hands each chunk to the output listeners (the FUSE
    view's ``tx`` taps) and then to the backend. Observers add themselves with
    :meth:`add_output_listener`; nobody wraps the model.
    """

    spec: DeviceSpec
    index: int
    model: Device = field(init=False)
    lock: threading.RLock = field(default_factory=threading.RLock)
    backend: Backend | None = None
    sessions: dict[SessionKey, SessionSink] = field(default_factory=dict)
    #: the model's interrupt lines, in wire-line order (see Device.irq_lines)
    lines: list[_InstanceIrq] = field(default_factory=list)
    reads: int = 0
    writes: int = 0
    irq_changes: int = 0
    #: the sessions that take this instance's shadow (they negotiated POSTED), and the
    #: shadow they were last given; empty for a model without one (Device.shadow)
    shadow_sinks: dict[SessionKey, ShadowSink] = field(default_factory=dict)
    shadow: RegisterShadow | None = None
    # Where the guest's output goes (stream devices): observers, then the backend.
    _output: tuple[OutputListener, ...] = field(default=(), init=False, repr=False)
    # ``sessions`` grouped by sink, for fanning an interrupt out (None: recompute)
    _fanout: list[tuple[SessionSink, tuple[int, ...]]] | None = field(
        default=None, init=False, repr=False)
    _to_backend: OutputListener | None = field(default=None, init=False, repr=False)

    def fanout(self) -> list[tuple[SessionSink, tuple[int, ...]]]:
        """(sink, its VM ids) for every sink attached (called with the lock held)."""
        f = self._fanout
        if f is None:
            groups: dict[int, tuple[SessionSink, list[int]]] = {}
            for (_client_id, vm_id), sink in self.sessions.items():
                g = groups.get(id(sink))
                if g is None:
                    groups[id(sink)] = (sink, [vm_id])
                else:
                    g[1].append(vm_id)
            f = self._fanout = [(sink, tuple(vms)) for sink, vms in groups.values()]
        return f

    def label(self) -> str:
        owners = ",".join(f"c{c}/vm{v}" for c, v in self.sessions) or "-"
        return f"{self.spec.id}#{self.index}[{owners}]"

    def to_guest(self, data: bytes) -> None:
        """Backend threads deliver bytes for the guest here (thread-safe)."""
        with self.lock:
            assert isinstance(self.model, ByteStream)
            self.model.feed(data)
            self.changed_outside()

    def changed_outside(self) -> None:
        """Something other than a guest access changed the model (a backend, the FUSE
        view): publish its shadow if that changed it. Called with the lock held."""
        if self.shadow_sinks:
            self.refresh_shadow()

    def refresh_shadow(self) -> None:
        """Publish the model's shadow if it changed (called with the lock held, after
        every access and outside event, so the new shadow travels before the answer
        or interrupt that follows it on each session's ordered queue)."""
        sh = self.model.shadow()
        if sh != self.shadow:
            self.shadow = sh
            device = self.spec.id
            for (_client_id, vm_id), sink in list(self.shadow_sinks.items()):
                sink.shadow(vm_id, device, sh)

    def from_guest(self, data: bytes) -> None:
        """A stream model's ``tx_sink``: what the guest transmits is published to every
        output listener, then passed to the backend (called with the lock held)."""
        for fn in self._output:
            try:
                fn(data)
            except Exception:  # an observer must never break the guest's output
                log.exception("output listener failed for %s", self.label())
        if self._to_backend is not None:
            self._to_backend(data)

    def add_output_listener(self, fn: OutputListener) -> None:
        """Call ``fn(data)`` with every chunk the guest transmits from now on."""
        with self.lock:
            self._output = (*self._output, fn)

    def remove_output_listener(self, fn: OutputListener) -> None:
        with self.lock:
            self._output = tuple(f for f in self._output if f != fn)

    @property
    def output_listeners(self) -> tuple[OutputListener, ...]:
        return self._output

    def key(self, code: str | int, pressed: bool) -> None:
        """Key backends deliver key presses and releases here (thread-safe): the
        instance is their KeySink, as ``to_guest`` is a stream backend's sink."""
        with self.lock:
            cast(KeySink, self.model).key(code, pressed)
            self.changed_outside()

    def _event(self, name: str) -> None:
        for (_client_id, vm_id), sink in list(self.sessions.items()):
            sink.event(vm_id, self.spec.id, name)

    def status(self) -> dict[str, Any]:
        with self.lock:
            st = dict(self.model.status())
        st.update(reads=self.reads, writes=self.writes, irq_changes=self.irq_changes,
                  backend=self.backend.describe() if self.backend else None,
                  sessions=[f"client {c} vm {v}" for c, v in self.sessions])
        return st

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.model.close()


def _mismatch(spec: DeviceSpec, backend: type[Backend], model: Device) -> str | None:
    """Why ``backend`` cannot serve ``model`` (None when it can): a stream backend
    needs a StreamDevice, a key backend a keyboard (a KeySink)."""
    if issubclass(backend, KeyBackend) and not isinstance(model, KeySink):
        return (f"device {spec.id!r} ({spec.kind}) takes no key events, so backend "
                f"{backend.name} cannot feed it (use a keyboard such as i8042)")
    if issubclass(backend, StreamBackend) and not isinstance(model, StreamDevice):
        return f"device {spec.id!r} ({spec.kind}) takes no stream backend"
    return None


def _check_backend(spec: DeviceSpec, model: Device) -> None:
    """At server start: the backend exists, suits the model, and can work here.

    A mismatch is a ValueError (a usage error). What this machine lacks comes last, as
    the backend's BackendUnavailable, so a wrong configuration is named first.
    """
    assert spec.backend is not None
    cls, _ = backend_class(spec.backend)
    why = _mismatch(spec, cls, model)
    if why:
        raise ValueError(why)
    check_backend(spec.backend)


def _start_backend(spec: DeviceSpec, inst: Instance, index: int) -> Backend:
    """Open the instance's backend and connect it to the model: bytes both ways for a
    stream backend, key events into the model (through the instance's lock) for a
    key backend. A backend that fails to start is closed again."""
    assert spec.backend is not None
    model = inst.model
    backend = open_backend(spec.backend, spec.id, index)
    try:
        why = _mismatch(spec, type(backend), model)
        if why:
            raise ValueError(why)
        if isinstance(backend, KeyBackend):
            backend.start(inst)
        else:
            assert isinstance(backend, StreamBackend) and isinstance(model, StreamDevice)
            inst._to_backend = backend.from_guest
            backend.start(inst.to_guest)
    except BaseException:
        backend.close()
        raise
    return backend


def _takes_shadow(sink: object, model: Device) -> bool:
    """Whether ``sink`` gets ``model``'s shadows: the model has one, and the session
    negotiated POSTED (sinks of other kinds, such as a peer's clients, never do)."""
    if type(model).shadow is Device.shadow:
        return False
    wants = getattr(sink, "wants_shadow", None)
    return bool(wants is not None and wants())


AccessHook = Callable[[int, int, str, int, int, int, int, int], None]


class Controller:
    """Holds the device registry and the live instances; answers requests.

    Thread-safe: each connection thread calls in concurrently. The registry lock is held
    only to find or create instances; a request then holds just its instance's lock.
    """

    def __init__(self, server_id: str, devices: list[DeviceSpec]) -> None:
        self.server_id = server_id
        self.registry: dict[str, DeviceSpec] = {}
        for spec in devices:
            if spec.id in self.registry:
                raise ValueError(f"device id {spec.id!r} is configured twice")
            model = create_device(spec.kind, **spec.options)  # fail early on a bad kind
            model.close()
            if spec.backend:
                _check_backend(spec, model)
            self.registry[spec.id] = spec
        self._lock = threading.Lock()
        # (client, vm, device) -> instance: the hot-path lookup of every request.
        self._attached: dict[tuple[int, int, str], Instance] = {}
        self._shared: dict[str, Instance] = {}
        self._per_device: dict[str, list[Instance]] = {d: [] for d in self.registry}
        # Attachments per client id, for the quota (None: no quota; the server sets it
        # from --max-instances-per-client). One client must not be able to use up the
        # descriptors every other client's attach needs.
        self.max_instances_per_client: int | None = None
        self._held: dict[int, int] = {}
        self.access_hook: AccessHook | None = None  # the demo's traffic display
        # Called with each new instance, complete but not yet reachable by a guest
        # (the FUSE view taps a UART's output from its first byte this way).
        self._instance_listeners: list[Callable[[Instance], None]] = []

    def add_instance_listener(self, fn: Callable[[Instance], None]) -> None:
        """Call ``fn(instance)`` for every instance created from now on."""
        self._instance_listeners.append(fn)

    def remove_instance_listener(self, fn: Callable[[Instance], None]) -> None:
        if fn in self._instance_listeners:
            self._instance_listeners.remove(fn)

    # -- sessions ---------------------------------------------------------------

    def _new_instance(self, spec: DeviceSpec) -> Instance:
        used = {i.index for i in self._per_device[spec.id]}
        index = next(i for i in range(len(used) + 1) if i not in used)
        inst = Instance(spec, index)
        # One _InstanceIrq per interrupt line the model declares, numbered as on the wire.
        lines = {name: _InstanceIrq(inst, n)
                 for n, name in enumerate(device_class(spec.kind).irq_lines)}
        inst.lines = list(lines.values())
        inst.model = create_device(spec.kind, events=inst._event, **lines, **spec.options)
        if isinstance(inst.model, ByteStream):
            inst.model.tx_sink = inst.from_guest  # the instance publishes the output
        if spec.backend:
            try:
                inst.backend = _start_backend(spec, inst, index)
            except BaseException:
                inst.model.close()
                raise
            log.info("%s: backend %s", spec.id if index == 0 else f"{spec.id}#{index}",
                     inst.backend.describe())
        self._per_device[spec.id].append(inst)
        for fn in list(self._instance_listeners):
            try:
                fn(inst)
            except Exception:  # an observer must never break an attach
                log.exception("instance listener failed for %s", spec.id)
        return inst

    def attach(self, client_id: int, vm_id: int, device: str, sink: SessionSink) -> Status:
        """Give (client, VM) an instance of ``device``; OK when already attached.

        Raises QuotaExceeded when the client already holds
        ``max_instances_per_client`` attachments (each VM's instance of a device, or
        its share of a shared one, is one)."""
        spec = self.registry.get(device)
        if spec is None:
            return Status.UNKNOWN_DEVICE
        key = (client_id, vm_id, device)
        with self._lock:
            inst = self._attached.get(key)
            if inst is not None:
                # Attached already: the client starts its shadow afresh all the same.
                with inst.lock:
                    shadow_sink = inst.shadow_sinks.get((client_id, vm_id))
                    if shadow_sink is not None:
                        shadow_sink.shadow(vm_id, device, inst.shadow)
                return Status.OK
            quota = self.max_instances_per_client
            held = self._held.get(client_id, 0)
            if quota is not None and held >= quota:
                raise QuotaExceeded(
                    f"client {client_id} already holds {held} device instance(s), the "
                    f"most one client may hold (--max-instances-per-client {quota}); "
                    f"detach a VM first")
            try:
                if spec.shared:
                    inst = self._shared.get(device) or self._new_instance(spec)
                    self._shared[device] = inst
                else:
                    inst = self._new_instance(spec)
            except (BackendError, OSError, ValueError) as e:
                # e.g. the next instance's tcp port is taken: this attach fails, the
                # connection and every other session carry on.
                log.error("device %s: no instance for client %d vm %d: %s", device,
                          client_id, vm_id, e)
                return Status.DEVICE_ERROR
            with inst.lock:
                inst.sessions[(client_id, vm_id)] = sink
                inst._fanout = None
                high = [irq.line for irq in inst.lines if irq.level]
                # Not for a shared device: others' accesses change its registers, and
                # every change would go to every sharer (a flood nobody asked for).
                if not spec.shared and _takes_shadow(sink, inst.model):
                    shadow_sink = cast(ShadowSink, sink)
                    inst.shadow_sinks[(client_id, vm_id)] = shadow_sink
                    inst.shadow = inst.model.shadow()
                    shadow_sink.shadow(vm_id, device, inst.shadow)  # before the attach's answer
            self._attached[key] = inst
            self._held[client_id] = held + 1
        log.info("client %d vm %d attached %s", client_id, vm_id, inst.label())
        for line in high:  # a shared device already asserting: tell the newcomer
            sink.interrupt(vm_id, device, line, True)
        return Status.OK

    def detach(self, client_id: int, vm_id: int | None = None) -> int:
        """Drop the VM's sessions (every VM of the client when ``vm_id`` is None)."""
        with self._lock:
            keys = [k for k in self._attached
                    if k[0] == client_id and (vm_id is None or k[1] == vm_id)]
            closing = []
            for key in keys:
                inst = self._attached.pop(key)
                left = self._held.get(key[0], 0) - 1
                if left > 0:
                    self._held[key[0]] = left
                else:
                    self._held.pop(key[0], None)
                with inst.lock:
                    inst.sessions.pop((key[0], key[1]), None)
                    inst._fanout = None
                    inst.shadow_sinks.pop((key[0], key[1]), None)
                    empty = not inst.sessions
                if empty:
                    self._per_device[inst.spec.id].remove(inst)
                    if inst.spec.shared:
                        self._shared.pop(inst.spec.id, None)
                    closing.append(inst)
        for inst in closing:
            inst.close()
        if keys:
            log.info("client %d %s detached (%d device(s))", client_id,
                     "all VMs" if vm_id is None else f"vm {vm_id}", len(keys))
        return len(keys)

    # -- the request path -------------------------------------------------------

    def access(self, client_id: int, vm_id: int, device: str, offset: int, size: int,
               direction: int, data: int) -> tuple[int, int]:
        """Perform one register access; returns (a Status value, value read or 0)."""
        # Every guest access runs this: plain-int constants, no enum lookups.
        inst = self._attached.get((client_id, vm_id, device))
        if inst is None:
            return (_UNKNOWN_DEVICE if device not in self.registry else _NOT_ATTACHED), 0
        model = inst.model
        if offset + size > model.window:
            return _BAD_ACCESS, 0
        try:
            with inst.lock:
                if direction == _WRITE:
                    inst.writes += 1
                    model.write(offset, size, data)
                    value = 0
                else:
                    inst.reads += 1
                    value = model.read(offset, size)
                if inst.shadow_sinks:
                    inst.refresh_shadow()
        except Exception:  # a model bug must not take the connection down
            log.exception("device %s failed on %s at offset %#x", device,
                          "write" if direction == _WRITE else "read", offset)
            return _DEVICE_ERROR, 0
        hook = self.access_hook
        if hook is not None:
            hook(client_id, vm_id, device, inst.index, offset, size, direction,
                 data if direction == _WRITE else value)
        return _OK, value

    def republish(self, client_id: int, vm_id: int, device: str) -> None:
        """Send (client, VM) its current shadow again: how a session returns posting
        credits (SHADOW's ``applied``) in order with the shadows other threads send."""
        inst = self._attached.get((client_id, vm_id, device))
        if inst is None:
            return
        with inst.lock:
            sink = inst.shadow_sinks.get((client_id, vm_id))
            if sink is not None:
                sink.shadow(vm_id, device, inst.shadow)

    # -- introspection ----------------------------------------------------------

    def line_levels(self, client_id: int) -> list[tuple[int, str, int, bool]]:
        """(vm, device, line, level) of every interrupt line of ``client_id``'s
        instances: what a resumed session must hear again, since changes raised while
        it had no connection went nowhere."""
        with self._lock:
            held = [(k[1], k[2], inst) for k, inst in self._attached.items()
                    if k[0] == client_id]
        return [(vm, dev, irq.line, irq.level) for vm, dev, inst in held
                for irq in inst.lines]

    def attached(self, client_id: int) -> list[tuple[int, str]]:
        """(vm, device) of every attachment of ``client_id``."""
        with self._lock:
            return [(k[1], k[2]) for k in self._attached if k[0] == client_id]

    def instances(self) -> list[Instance]:
        with self._lock:
            return [i for lst in self._per_device.values() for i in lst]

    def close(self) -> None:
        with self._lock:
            insts = [i for lst in self._per_device.values() for i in lst]
            self._attached.clear()
            self._held.clear()
            self._shared.clear()
            for lst in self._per_device.values():
                lst.clear()
        for inst in insts:
            inst.close()
