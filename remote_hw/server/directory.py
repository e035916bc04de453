"""Which server holds which software device.

Two kinds, one interface:

* :class:`StaticDirectory` — from configuration (``--peer b=HOST:PORT`` and ``--route
  DEVICE=b``); the embedded default on one machine.
* :class:`EtcdDirectory` — kept in etcd: each server registers its address and its
  devices under a lease it keeps alive, so a server that dies drops out of the
  directory by itself when the lease expires, and a server that comes back (or a
  device that moves) is found again by the next lookup.

Keys (values are JSON): ``/remote-hw/servers/<id>`` = ``{"address": [host, port]}``,
``/remote-hw/devices/<device>`` = ``{"server": id}``.

etcd is reached through its v3 HTTP/JSON gateway with the standard library only, so a
server needs no gRPC stack.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Protocol

log = logging.getLogger("remote_hw.directory")

PREFIX = "/remote-hw/"


class DirectoryError(RuntimeError):
    """The directory cannot be reached or answered nonsense."""


class Directory(Protocol):
    """Lookups the forwarding code needs; registration for servers that publish."""

    def lookup(self, device: str) -> str | None:
        """The id of the server that holds ``device``, or None."""

    def address(self, server_id: str) -> tuple[str, int] | None:
        """Where ``server_id`` listens, or None when it is not (or no longer) known."""

    def register(self, server_id: str, address: tuple[str, int], devices: list[str]) -> None:
        """Publish this server and its devices."""

    def close(self) -> None:
        """Withdraw what was registered and stop background work."""


class StaticDirectory:
    """A fixed table from configuration."""

    def __init__(self, servers: dict[str, tuple[str, int]] | None = None,
                 routes: dict[str, str] | None = None) -> None:
        self.servers = dict(servers or {})
        self.routes = dict(routes or {})

    def lookup(self, device: str) -> str | None:
        return self.routes.get(device)

    def address(self, server_id: str) -> tuple[str, int] | None:
        return self.servers.get(server_id)

    def register(self, server_id: str, address: tuple[str, int], devices: list[str]) -> None:
        self.servers[server_id] = address
        for d in devices:
            self.routes[d] = server_id

    def close(self) -> None:
        pass


class LayeredDirectory:
    """Static entries first, then a dynamic directory (etcd) for everything else."""

    def __init__(self, static: StaticDirectory, dynamic: Directory | None) -> None:
        self.static = static
        self.dynamic = dynamic

    def lookup(self, device: str) -> str | None:
        found = self.static.lookup(device)
        if found is None and self.dynamic is not None:
            found = self.dynamic.lookup(device)
        return found

    def address(self, server_id: str) -> tuple[str, int] | None:
        found = self.static.address(server_id)
        if found is None and self.dynamic is not None:
            found = self.dynamic.address(server_id)
        return found

    def register(self, server_id: str, address: tuple[str, int], devices: list[str]) -> None:
        if self.dynamic is not None:
            self.dynamic.register(server_id, address, devices)

    def close(self) -> None:
        if self.dynamic is not None:
            self.dynamic.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class EtcdClient:
    """The few etcd v3 calls remote-hw needs, over the HTTP/JSON gateway."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.endpoint}/v3/{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise DirectoryError(f"etcd at {self.endpoint}: {path}: HTTP {e.code}: "
                                 f"{e.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DirectoryError(f"etcd at {self.endpoint} cannot be reached: {reason}") \
                from None

    def grant(self, ttl: int) -> str:
        return str(self._call("lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: str) -> int:
        res = self._call("lease/keepalive", {"ID": lease}).get("result", {})
        return int(res.get("TTL", 0))

    def revoke(self, lease: str) -> None:
        self._call("lease/revoke", {"ID": lease})

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._call("kv/put", body)

    def get(self, key: str) -> str | None:
        kvs = self._call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _unb64(kvs[0]["value"]) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self._call("kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get(
            "kvs", [])
        return {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in kvs}

    def delete(self, key: str) -> None:
        self._call("kv/deleterange", {"key": _b64(key)})


class EtcdDirectory:
    """The directory kept in etcd, with this server's registration under a lease."""

    def __init__(self, endpoint: str, ttl: int = 5, cache_seconds: float = 0.5) -> None:
        self.client = EtcdClient(endpoint)
        self.ttl = ttl
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, object]] = {}
        self._lease: str | None = None
        self._registration: tuple[str, tuple[str, int], list[str]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cached_get(self, key: str) -> dict | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]  # type: ignore[return-value]
        try:
            raw = self.client.get(key)
        except DirectoryError as e:
            log.warning("%s", e)
            return None
        value = json.loads(raw) if raw else None
        self._cache[key] = (now, value)
        return value

    def lookup(self, device: str) -> str | None:
        v = self._cached_get(f"{PREFIX}devices/{device}")
        return str(v["server"]) if v else None

    def address(self, server_id: str) -> tuple[str, int] | None:
        v = self._cached_get(f"{PREFIX}servers/{server_id}")
        return (str(v["address"][0]), int(v["address"][1])) if v else None

    def servers(self) -> dict[str, tuple[str, int]]:
        """Every live server (for status and tests)."""
        out = {}
        for key, raw in self.client.get_prefix(f"{PREFIX}servers/").items():
            v = json.loads(raw)
            out[key.rsplit("/", 1)[1]] = (v["address"][0], int(v["address"][1]))
        return out

    def register(self, server_id: str, address: tuple[str, int], devices: list[str]) -> None:
        """Publish under a lease and keep it alive in a thread (re-registers after loss)."""
        self._registration = (server_id, address, list(devices))
        self._publish()
        self._thread = threading.Thread(target=self._keepalive, name="etcd-lease",
                                        daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        server_id, address, devices = self._registration  # type: ignore[misc]
        lease = self.client.grant(self.ttl)
        self.client.put(f"{PREFIX}servers/{server_id}",
                        json.dumps({"address": list(address)}), lease)
        for d in devices:
            self.client.put(f"{PREFIX}devices/{d}", json.dumps({"server": server_id}), lease)
        self._lease = lease
        log.info("registered server %s (%d device(s)) in etcd at %s, lease %ss", server_id,
                 len(devices), self.client.endpoint, self.ttl)

    def _keepalive(self) -> None:
        while not self._stop.wait(max(self.ttl / 3, 0.2)):
            try:
                if self._lease is None or self.client.keepalive(self._lease) <= 0:
                    self._publish()  # the lease expired (etcd was away): register again
            except DirectoryError as e:
                log.warning("keeping the directory lease: %s", e)
                self._lease = None

    def close(self) -> None:
        self._stop.set()
        if self._lease is not None:
            try:
                self.client.revoke(self._lease)
            except DirectoryError:
                pass
            self._lease = None
