"""The eBPF probes, for real: bcc programs on the kvm tracepoints, real KVM guests.

* remote-hw's agent forwarding a range to a real server on loopback: the probe's
  remote count equals the requests forwarded, exactly; local and unmapped too; the
  stall histogram of forwarded accesses lies above that of local ones.
* a KVM program the test writes itself (ctypes, no remote-hw code) in a child process:
  seen, counted exactly, attributed to its process (and VM, once published).
* `trace` and `top` as commands, a probe source that does not compile.

Skipped (with the reason; markers kvm, root, bpf in tests/conftest.py) only where the
probes cannot run at all: not root, no bcc, no kvm tracepoints, no kernel headers, no
/dev/kvm. A probe that fails to compile or load where all of those are present fails
the test.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from remote_hw import resources
from remote_hw.probes import model as M
from remote_hw.probes.agent_hook import ProbeSession
from remote_hw.probes.loader import KvmProbe

REPO = Path(__file__).resolve().parent.parent
IOLOOP = REPO / "guests" / "build" / "ioloop.bin"


pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.bpf]


@pytest.fixture
def session():
    s = ProbeSession.open()          # compile failures fail here (not skipped)
    yield s
    s.close()


# ------------------------------------------------------------- a KVM program of our own

MINIKVM = textwrap.dedent(r'''
    """A KVM program with no remote-hw code: a real-mode guest doing known accesses.

    argv: READS PORT_R WRITES PORT_W MMIO_LOOPS [REPEAT]  (0 = forever)
    Prints "ready PID VCPU_FD", waits for a line on stdin, runs, prints a JSON summary.
    """
    import ctypes, fcntl, json, mmap, os, struct, sys

    KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU = 0xAE01, 0xAE04, 0xAE41
    KVM_SET_USER_MEMORY_REGION, KVM_RUN = 0x4020AE46, 0xAE80
    KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS = 0x4090AE82, 0x8138AE83, 0x4138AE84
    MEM = 0x10000

    def program(reads, port_r, writes, port_w, mmio):
        w = lambda v: struct.pack("<H", v)
        c = b""
        if reads:    # mov cx, n; mov dx, port; 1: in al, dx; dec cx; jnz 1b
            c += b"\xb9" + w(reads) + b"\xba" + w(port_r) + b"\xec\x49\x75\xfc"
        if writes:   # ... out dx, al ...
            c += b"\xb9" + w(writes) + b"\xba" + w(port_w) + b"\xee\x49\x75\xfc"
        if mmio:     # ds = 0x2000; 1: mov al, [0x10]; mov [0x10], al; dec cx; jnz 1b
            c += b"\xb8\x00\x20\x8e\xd8\xb9" + w(mmio) + b"\xa0\x10\x00\xa2\x10\x00\x49\x75\xf7"
        return c + b"\xf4"                                      # hlt

    ctypes.CDLL(None).prctl(1, 9)       # PR_SET_PDEATHSIG, SIGKILL: dies with the test
    reads, port_r, writes, port_w, mmio = (int(a, 0) for a in sys.argv[1:6])
    repeat = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, MEM, host))
    code = program(reads, port_r, writes, port_w, mmio)
    mem[0x1000:0x1000 + len(code)] = code
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
    struct.pack_into("<QIH", sregs, 0, 0, 0xFFFF, 0)            # cs: base 0, selector 0

    def reset():
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("<QQ", regs, 128, 0x1000, 2)           # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    print("ready", os.getpid(), vcpu, flush=True)
    sys.stdin.readline()
    seen = {"pio_in": 0, "pio_out": 0, "mmio_read": 0, "mmio_write": 0, "runs": 0}
    while repeat == 0 or seen["runs"] < repeat:
        reset()
        while True:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("<I", run, 8)[0]
            if reason == 2:                                     # KVM_EXIT_IO
                direction, size, port, count, off = struct.unpack_from("<BBHIQ", run, 32)
                if direction:
                    seen["pio_out"] += count
                else:
                    seen["pio_in"] += count
                    run[off:off + size * count] = b"\x5a" * (size * count)
            elif reason == 6:                                   # KVM_EXIT_MMIO
                is_write = run[52]
                seen["mmio_write" if is_write else "mmio_read"] += 1
                if not is_write:
                    run[40:48] = b"\x5a" * 8
            elif reason == 5:                                   # KVM_EXIT_HLT
                break
            else:
                sys.exit(f"unexpected exit reason {reason}")
        seen["runs"] += 1
    print(json.dumps(seen), flush=True)
''')


class MiniKvm:
    """The program above in a child process, held at "ready" until ``go()``."""

    def __init__(self, tmp_path: Path, *args: int) -> None:
        script = tmp_path / "minikvm.py"
        script.write_text(MINIKVM)
        self.p = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().split()
        assert line[:1] == ["ready"], f"minikvm did not start: {line}"
        self.pid, self.vcpu_fd = int(line[1]), int(line[2])

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def result(self, timeout: float = 60) -> dict:
        out, _ = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def _by(rows, *fields):
    out: dict = {}
    for r in rows:
        key = tuple(getattr(r, f) for f in fields)
        out[key] = out.get(key, 0) + r.accesses
    return out


def test_own_kvm_program_is_seen_and_attributed_to_its_process(session, tmp_path):
    vm = MiniKvm(tmp_path, 300, 0x80, 200, 0x81, 50)
    try:
        vm.go()
        seen = vm.result()
    finally:
        vm.kill()
    assert seen == {"pio_in": 300, "pio_out": 200, "mmio_read": 50, "mmio_write": 50, "runs": 1}
    rows = session.counts(pid=vm.pid)
    # nobody published ranges for it: everything unmapped, per port / MMIO page
    assert _by(rows, "cls", "kind", "dir", "addr") == {
        (M.CLS_UNMAPPED, M.KIND_PORT, M.DIR_READ, 0x80): 300,
        (M.CLS_UNMAPPED, M.KIND_PORT, M.DIR_WRITE, 0x81): 200,
        (M.CLS_UNMAPPED, M.KIND_MMIO, M.DIR_READ, 0x20000): 50,
        (M.CLS_UNMAPPED, M.KIND_MMIO, M.DIR_WRITE, 0x20000): 50}
    assert all(r.vm == 0 for r in rows)
    # every one of them went out to the program: one stall sample each
    assert sum(h.total for h in session.stall_histograms(pid=vm.pid).values()) == 600
    # the process has ended: its name comes from what the kernel side recorded
    assert session.probe.process_name(vm.pid).startswith("python")
    # and no access of that process was counted for another
    assert vm.pid not in {r.tgid for r in session.counts() if r.tgid != vm.pid}


def test_ranges_published_for_another_monitor_class_its_accesses(session, tmp_path):
    vm = MiniKvm(tmp_path, 120, 0x80, 70, 0x81, 30)
    try:
        session.publish_ranges(vm.pid, [("port", 0x80, 0x80, "fake/remote80"),
                                        ("mmio", 0x20000, 0x20FFF, "fake/ram-hole", "local")],
                               vm_id=9, vcpu_tids=[vm.pid])
        vm.go()
        vm.result()
    finally:
        vm.kill()
    rows = session.counts(pid=vm.pid)
    assert {r.vm for r in rows} == {9}                     # through its vCPU thread
    assert session.class_totals(pid=vm.pid) == {"remote": 120, "local": 60, "unmapped": 70}
    report = session.report(("remote", "local"))
    assert [(r.pid, r.vm, r.device, r.reads, r.writes) for r in report] == [
        (vm.pid, 9, "fake/ram-hole", 30, 30), (vm.pid, 9, "fake/remote80", 120, 0)]
    line = rf"pid {vm.pid} \(python[\w.]*\) vm 9: 120 remote, 60 local, 70 unmapped accesses"
    assert [ln for ln in session.vm_lines() if re.fullmatch(line, ln)], session.vm_lines()
    # the process has ended: pruning drops what was published for it
    session.probe.prune()
    assert all(t != vm.pid for t, _, _ in session.probe.published())


# ----------------------------------------------------- remote-hw's agent and a server

def _image(tmp_path: Path, name: str, count: int, port: int, mode: int = 0) -> str:
    img = bytearray(IOLOOP.read_bytes())
    struct.pack_into("<III", img, 4, count, port, mode)
    path = tmp_path / f"{name}.bin"
    path.write_bytes(img)
    return str(path)


class LocalScratch:
    """A device the monitor answers itself."""

    def __init__(self) -> None:
        self.n = 0

    def read(self, offset: int, size: int) -> int:
        self.n += 1
        return 0x42

    def write(self, offset: int, size: int, value: int) -> None:
        self.n += 1


@pytest.fixture
def server():
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller
    from remote_hw.server.listener import Server
    srv = Server(Controller("a", [DeviceSpec("uart0", "uart16550"),
                                  DeviceSpec("uart1", "uart16550")]), "127.0.0.1", 0).start()
    yield srv
    srv.stop()


def test_agent_counts_are_exact_and_remote_stalls_lie_above_local(session, server, tmp_path):
    from remote_hw.client.agent import Agent
    from remote_hw.config import MapSpec, VmConfig

    if not IOLOOP.is_file():
        pytest.fail(f"{IOLOOP} is missing: run guests/build.sh")
    N_REMOTE, N_STRING, N_LOCAL, N_UNMAPPED = 3000, 700, 3000, 1500
    agent = Agent({"a": server.address})
    try:
        configs = [
            # vm 1: N reads of the UART's scratch register, on the server
            VmConfig(1, _image(tmp_path, "r", N_REMOTE, 0x3FF),
                     maps=[MapSpec("port", 0x3F8, 0x3FF, "a", "uart0")]),
            # vm 2: string I/O (rep insb + rep outsb) on the server: 2 * N elements
            VmConfig(2, _image(tmp_path, "s", N_STRING, 0x2FF, mode=2),
                     maps=[MapSpec("port", 0x2F8, 0x2FF, "a", "uart1")]),
            # vm 3: reads of a device the monitor answers itself
            VmConfig(3, _image(tmp_path, "l", N_LOCAL, 0x80)),
            # vm 4: reads of a port nobody maps
            VmConfig(4, _image(tmp_path, "u", N_UNMAPPED, 0x2E8)),
        ]
        handles = {c.vm_id: agent.add_vm(c) for c in configs}
        local = LocalScratch()
        handles[3].vm.bus.map_ports(0x80, 0x87, local)
        for c in configs:
            session.publish_vm(handles[c.vm_id].vm, c.maps, vm_id=c.vm_id)
        session.publish_ranges(os.getpid(), [("port", 0x80, 0x87, "scratch", "local"),
                                             ("port", 0xF4, 0xF4, "debug-exit", "local")],
                               vm_id=3, vcpu_tids=[])
        agent.connect()
        agent.start()
        statuses = agent.wait(120)
    finally:
        agent.stop()
    assert all(s is not None and s & 1 for s in statuses.values()), statuses  # debug exit

    pid = os.getpid()
    forwarded = {vm_id: sum(d.forwarded for d in h.devices) for vm_id, h in handles.items()}
    assert forwarded == {1: N_REMOTE, 2: 2 * N_STRING, 3: 0, 4: 0}
    assert local.n == N_LOCAL
    assert handles[4].vm.bus.unmapped_reads == N_UNMAPPED
    totals = {vm_id: session.class_totals(pid=pid, vm_id=vm_id) for vm_id in handles}
    assert totals == {
        1: {"remote": forwarded[1], "local": 1, "unmapped": 0},
        2: {"remote": forwarded[2], "local": 1, "unmapped": 0},
        3: {"remote": 0, "local": N_LOCAL + 1, "unmapped": 0},
        4: {"remote": 0, "local": 1, "unmapped": N_UNMAPPED}}
    # per device range, with the agent's labels
    by_dev = {(r.vm, r.device): (r.reads, r.writes) for r in session.report()}
    assert by_dev == {(1, "a/uart0"): (N_REMOTE, 0), (2, "a/uart1"): (N_STRING, N_STRING)}

    # the stall each forwarded access caused, against those answered in the monitor
    remote = session.stall_histograms(pid=pid, vm_id=1)["remote"]
    local_h = session.stall_histograms(pid=pid, vm_id=3)["local"]
    unmapped = session.stall_histograms(pid=pid, vm_id=4)["unmapped"]
    assert remote.total == N_REMOTE            # one sample per access (one exit each)
    assert local_h.total == N_LOCAL            # the debug exit never re-enters
    assert unmapped.total == N_UNMAPPED
    assert remote.percentile(50) > local_h.percentile(50)
    assert remote.percentile(25) > local_h.percentile(50)
    assert remote.percentile(90) > local_h.percentile(90)
    assert remote.mean_us() > 2 * local_h.mean_us()


# ------------------------------------------------------------------ the commands

def _probe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "remote_hw.probes.cli", *args]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def test_trace_command_streams_filtered_accesses(session, tmp_path):
    vm = MiniKvm(tmp_path, 40, 0x80, 25, 0x81, 5)
    session.publish_ranges(vm.pid, [("port", 0x81, 0x81, "b/out81")], vcpu_tids=[vm.pid])
    tr = subprocess.Popen(_probe_cmd("trace", "--vm", str(vm.pid), "--dir", "write",
                                     "--kind", "port", "--count", "25", "--duration", "60"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env(), cwd=REPO)
    try:
        header = tr.stdout.readline()               # printed once the probes are attached
        assert header.split()[:3] == ["TIME(s)", "PID", "VM"], (header, tr.stderr.read())
        vm.go()
        vm.result()
        out, err = tr.communicate(timeout=60)
    finally:
        vm.kill()
        if tr.poll() is None:
            tr.kill()
            tr.wait()
    assert tr.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 25, out
    for line in lines:
        f = line.split()
        assert f[1] == str(vm.pid) and f[4:7] == ["port", "write", "0x81"], line
        assert f[10] == "remote" and f[-1] == "b/out81", line
        assert float(f[11]) > 0                     # went out to the program: a stall
    assert "25 accesses shown" in err


def test_top_command_shows_rates_per_vm_and_device(session, tmp_path):
    vm = MiniKvm(tmp_path, 2000, 0x80, 0, 0x81, 0, 0)         # forever
    try:
        session.publish_ranges(vm.pid, [("port", 0x80, 0x80, "c/in80")], vm_id=4,
                               vcpu_tids=[vm.pid])
        vm.go()
        top = subprocess.run(_probe_cmd("top", "--vm", str(vm.pid), "--interval", "0.5",
                                        "--iterations", "2"),
                             capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    finally:
        vm.kill()
    assert top.returncode == 0, top.stderr
    frames = [f for f in re.split(r"(?m)^(?=remote-hw top:)", top.stdout) if f.strip()]
    assert len(frames) == 2, top.stdout
    last = frames[-1]
    vm_rows = [ln.split() for ln in last.splitlines() if ln.split()[:1] == [str(vm.pid)]]
    assert len(vm_rows) == 1, last
    pid, vmid, name, total, remote, localr, unmapped = vm_rows[0][:7]
    assert vmid == "4" and float(total) > 0 and float(remote) == float(total), last
    dev_rows = [ln.split() for ln in last.splitlines() if ln.startswith("c/in80")]
    assert len(dev_rows) == 1 and dev_rows[0][1] == "remote", last
    assert dev_rows[0][5] != "-"                              # a stall p50


def test_probe_that_does_not_compile_fails_in_one_sentence(tmp_path):
    src = tmp_path / "ebpf"
    src.mkdir()
    (src / M.HEADER).write_text(M.header_path().read_text())
    (src / "kvm_access.bpf.c").write_text(
        (resources.ebpf_dir() / "kvm_access.bpf.c").read_text() + "\nthis is not C;\n")
    for command in ("trace", "top"):
        r = subprocess.run(_probe_cmd(command, "--duration" if command == "trace"
                                      else "--iterations", "1"),
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env=dict(_env(), REMOTE_HW_EBPF_DIR=str(src)))
        assert r.returncode == 1, r
        err = r.stderr.strip().splitlines()
        assert len(err) == 1, r.stderr
        assert err[0].startswith(f"remote-hw {command}: bcc could not compile"), err
        assert r.stdout == ""


def test_bcc_map_layouts_match_the_header(session):
    import ctypes
    bpf = session.probe.bpf
    for table, key, leaf in (("ranges", "rhw_range_key", "rhw_range_val"),
                             ("vcpu_vm", None, "rhw_vcpu_val"),
                             ("pubs", None, "rhw_pub"),
                             ("counts", "rhw_count_key", "rhw_count_val"),
                             ("stall_hist", "rhw_hist_key", None),
                             ("procs", None, "rhw_proc")):
        t = bpf[table.encode()]
        if key:
            assert ctypes.sizeof(t.Key) == ctypes.sizeof(M.header_struct(key)), table
        if leaf:
            size = ctypes.sizeof(t.Leaf)
            if hasattr(t, "total_cpu"):                      # per-CPU: one per CPU
                size //= t.total_cpu
            assert size == ctypes.sizeof(M.header_struct(leaf)), table


def test_ranges_are_shared_between_loaders_through_bpffs(session):
    if session.probe.pin_dir is None:
        pytest.skip("bpffs cannot be mounted here: ranges stay per loader")
    session.publish_ranges(os.getpid(), [("mmio", 0xFED0_0000, 0xFED0_03FF, "a/hpet", "remote")],
                           vm_id=77)
    other = KvmProbe()
    try:
        got = [(t, v, r) for t, v, r in other.published() if t == os.getpid() and v == 77]
        assert got == [(os.getpid(), 77, M.RangeSpec("mmio", 0xFED0_0000, 0xFED0_03FF,
                                                     "a/hpet", "remote"))]
        assert other.label(os.getpid(), 77, M.KIND_MMIO, 0xFED0_0000, M.CLS_REMOTE) == "a/hpet"
    finally:
        other.close()
    session.unpublish(os.getpid(), 77)
    assert not [1 for t, v, _ in session.probe.published() if t == os.getpid() and v == 77]


def test_host_wide_ranges_class_every_process_without_its_own(session, tmp_path):
    vm = MiniKvm(tmp_path, 30, 0x80, 20, 0x81, 0)
    try:
        session.publish_ranges(0, [("port", 0x81, 0x81, "host/out81")])
        vm.go()
        vm.result()
    finally:
        vm.kill()
        session.unpublish(0)
    assert session.class_totals(pid=vm.pid) == {"remote": 20, "local": 0, "unmapped": 30}
    assert [(r.device, r.writes) for r in session.report() if r.pid == vm.pid] == \
        [("host/out81", 20)]


@pytest.mark.parametrize("entry, pin", [("syscalls:sys_enter_ioctl", True),
                                        ("kvm:kvm_fpu", False)])
def test_other_entry_tracepoint_and_unpinned_maps_count_the_same(entry, pin, tmp_path):
    """The fallback for kernels without kvm_fpu (the KVM_RUN ioctl's syscall tracepoint),
    and maps kept private to the loader where bpffs cannot be mounted."""
    session = ProbeSession(KvmProbe(entry=entry, pin=pin))
    vm = MiniKvm(tmp_path, 200, 0x80, 100, 0x81, 40)
    try:
        assert session.probe.entry == entry
        assert (session.probe.pin_dir is None) == (not pin)
        session.publish_ranges(vm.pid, [("port", 0x80, 0x80, "d/in80"),
                                        ("port", 0x81, 0x81, "d/out81", "local")],
                               vm_id=2, vcpu_tids=[vm.pid])
        vm.go()
        vm.result()
        assert session.class_totals(pid=vm.pid, vm_id=2) == \
            {"remote": 200, "local": 100, "unmapped": 80}
        hists = session.stall_histograms(pid=vm.pid)
        assert (hists["remote"].total, hists["local"].total, hists["unmapped"].total) == \
            (200, 100, 80)
    finally:
        vm.kill()
        session.close()


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_publishing_while_a_guest_runs_takes_effect(session, tmp_path):
    vm = MiniKvm(tmp_path, 1000, 0x80, 0, 0x81, 0, 0)         # forever
    try:
        vm.go()

        def totals():
            return session.class_totals(pid=vm.pid)
        assert _wait_for(lambda: totals()["unmapped"] > 0)
        session.publish_ranges(vm.pid, [("port", 0x80, 0x80, "e/in80")], vm_id=5,
                               vcpu_tids=[vm.pid])
        assert _wait_for(lambda: totals()["remote"] > 0)
        before = totals()
        assert _wait_for(lambda: totals()["remote"] > before["remote"] + 1000)
        # the classification is now remote and stays so, and for VM 5
        mid = totals()
        assert _wait_for(lambda: totals()["remote"] > mid["remote"] + 1000)
        assert totals()["unmapped"] == mid["unmapped"]
        assert session.class_totals(pid=vm.pid, vm_id=5)["remote"] > 0
        session.unpublish(vm.pid)
        after = totals()
        assert _wait_for(lambda: totals()["unmapped"] > after["unmapped"] + 1000)
    finally:
        vm.kill()
