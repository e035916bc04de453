"""Name -> class tables filled from an entry-point group: the plugin registries.

Device kinds (group ``remote_hw.devices``) and backends (``remote_hw.backends``) are
found in installed distributions' metadata, and remote-hw's own are registered there
the same way (its ``pyproject.toml``), so a third party's model travels exactly the
path a built-in does and there is one loading code to test.

Loading is lazy and per name, as nbdkit loads only the plugin it is asked for: a
server imports the plugins its ``--device`` options name and nothing else, so a broken
plugin it does not use cannot stop it. Listing (``--list-devices``) loads all of them
and reports each failure in one line, keeping the others. Before a class is handed
out it is checked (a class, the right base, the ``api_version`` it declares, and the
checks of the registry that owns the table), so a plugin stays small and a mistake in
one is named at start-up, not at a guest's first access.

Nothing here knows devices or backends; ``remote_hw.devices.registry`` and
``remote_hw.backends.registry`` each own one table.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from importlib import metadata
from typing import Final, Generic, TypeVar, cast

#: The plugin API's version, (major, minor). A plugin class may declare the version it
#: was written for as ``api_version = (major, minor)``; it loads when the major numbers
#: are equal and its minor is not newer than this one. Minor releases only add (new
#: optional methods, new fields at the end); a major release may change the contract.
API_VERSION: Final[tuple[int, int]] = (1, 0)

#: The distribution whose entry points are the built-in ones.
BUILTIN_DISTRIBUTION: Final = "remote-hw"
BUILTIN: Final = "built-in"
IN_PROCESS: Final = "in-process"

T = TypeVar("T")


class PluginError(ValueError):
    """A plugin could not be loaded or failed a check; the message is one line that
    names it, its entry point and what went wrong. A ValueError, so commands report it
    as a configuration error."""


@dataclass(frozen=True)
class Registered:
    """One name of a table: where it comes from, before anything is imported."""

    name: str
    value: str    # the entry point's "module:attribute" (or the class, in-process)
    source: str   # "built-in", a distribution name, or "in-process"


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)   # set on entry points found through distributions
    return None if dist is None else str(dist.name)


def _normalize(dist: str) -> str:
    """A distribution name as PEP 503 compares them (``Remote_HW`` is ``remote-hw``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _source(dist: str | None) -> str:
    if dist is None:
        return "unknown distribution"
    return BUILTIN if _normalize(dist) == _normalize(BUILTIN_DISTRIBUTION) else dist


def check_api_version(cls: type, label: str) -> None:
    """Raise PluginError if ``cls`` declares an ``api_version`` this remote-hw cannot
    serve (see :data:`API_VERSION`); a class that declares none is not checked."""
    declared = getattr(cls, "api_version", None)
    if declared is None:
        return
    ok_shape = (isinstance(declared, tuple) and len(declared) == 2
                and all(isinstance(n, int) for n in declared))
    if not ok_shape:
        raise PluginError(f"{label}: api_version must be a (major, minor) tuple of ints, "
                          f"got {declared!r}")
    major, minor = declared
    if major != API_VERSION[0] or minor > API_VERSION[1]:
        raise PluginError(f"{label}: written for plugin API {major}.{minor}, this remote-hw "
                          f"has {API_VERSION[0]}.{API_VERSION[1]}")


class PluginTable(MutableMapping[str, type[T]], Generic[T]):
    """The classes registered in one entry-point group, by name.

    Reading a name imports and checks that one plugin (cached); iterating gives the
    names without importing anything. Setting a name registers a class in this process
    only (tests, embedding programs) and overrides an entry point of that name;
    deleting one removes such a registration. ``refresh()`` reads the metadata again
    (after a ``pip install`` in the same process).

    ``check(name, cls)`` is the owning registry's own test of a loaded class (a
    device's ``kind`` and ``window``, a backend's ``name``); it raises PluginError.
    """

    def __init__(self, group: str, base: type, what: str,
                 check: Callable[[str, type[T]], None] | None = None) -> None:
        # ``base`` is typed ``type``, not ``type[T]``: the bases (Device, Backend) are
        # abstract, and mypy refuses an abstract class where ``type[T]`` is expected.
        self.group = group
        self.base = base
        self.what = what      # "device kind", "backend": the start of messages
        self._check = check
        self._overrides: dict[str, type[T]] = {}
        self._loaded: dict[str, type[T]] = {}
        self._found: dict[str, tuple[metadata.EntryPoint, str]] | None = None
        self._conflicts: list[str] = []
        # Connection threads attach VMs concurrently: one of them imports a plugin,
        # the others wait for it rather than import it a second time.
        self._lock = threading.RLock()

    # -- the metadata ---------------------------------------------------------------

    def refresh(self) -> None:
        """Forget what was read from the metadata (in-process registrations stay)."""
        with self._lock:
            self._found = None
            self._loaded.clear()
            self._conflicts = []

    def _entries(self) -> dict[str, tuple[metadata.EntryPoint, str]]:
        """name -> (entry point, source). Where two distributions register the same
        name, the built-in one wins, else the first found; the others are reported by
        ``load_all`` and never loaded."""
        with self._lock:
            if self._found is None:
                self._found, self._conflicts = self._scan()
            return self._found

    def _scan(self) -> tuple[dict[str, tuple[metadata.EntryPoint, str]], list[str]]:
        """Read the group from every installed distribution's metadata."""
        found: dict[str, tuple[metadata.EntryPoint, str]] = {}
        conflicts: list[str] = []
        for ep in metadata.entry_points(group=self.group):
            entry = (ep, _source(_dist_name(ep)))
            kept = found.setdefault(ep.name, entry)
            if kept is entry:
                continue
            if entry[1] == BUILTIN:          # a plugin may not take a built-in's name
                found[ep.name], entry, kept = entry, kept, entry
            conflicts.append(f"{self.what} {ep.name!r} from {entry[1]} "
                             f"({entry[0].value}) ignored: {kept[1]} registers "
                             f"that name too")
        return found, conflicts

    def registered(self) -> list[Registered]:
        """Every name with its source, sorted, without importing any plugin."""
        rows = {name: Registered(name, ep.value, source)
                for name, (ep, source) in self._entries().items()}
        for name, cls in self._overrides.items():
            rows[name] = Registered(name, f"{cls.__module__}:{cls.__qualname__}", IN_PROCESS)
        return [rows[n] for n in sorted(rows)]

    def source(self, name: str) -> str:
        """Where ``name`` comes from ("built-in", a distribution, "in-process")."""
        if name in self._overrides:
            return IN_PROCESS
        return self._entries()[name][1]

    # -- loading --------------------------------------------------------------------

    def _load(self, name: str, ep: metadata.EntryPoint, source: str) -> type[T]:
        label = f"{self.what} {name!r} (entry point {name} = {ep.value}, from {source})"
        try:
            obj = ep.load()
        except Exception as e:  # whatever a plugin's import raises, it is one line
            detail = " ".join(str(e).split())
            raise PluginError(f"{label} failed to load: {type(e).__name__}"
                              f"{': ' + detail if detail else ''}") from e
        if not isinstance(obj, type) or not issubclass(obj, self.base):
            raise PluginError(f"{label} is not a subclass of "
                              f"{self.base.__module__}.{self.base.__qualname__}: {obj!r}")
        cls = cast("type[T]", obj)
        check_api_version(cls, label)
        if self._check is not None:
            try:
                self._check(name, cls)
            except PluginError as e:
                raise PluginError(f"{label}: {e}") from None
        return cls

    def __getitem__(self, name: str) -> type[T]:
        """The class registered as ``name``: KeyError when there is none, PluginError
        when it fails to load or a check."""
        cls = self._overrides.get(name) or self._loaded.get(name)
        if cls is not None:
            return cls
        with self._lock:
            cls = self._loaded.get(name)
            if cls is None:
                ep, source = self._entries()[name]
                cls = self._loaded[name] = self._load(name, ep, source)
            return cls

    def load_all(self) -> tuple[list[tuple[Registered, type[T]]], list[str]]:
        """Load every registered name: (the ones that loaded, with their class) and
        one line per failure or name conflict. A failure does not stop the others."""
        ok: list[tuple[Registered, type[T]]] = []
        errors: list[str] = []
        for row in self.registered():
            try:
                ok.append((row, self[row.name]))
            except PluginError as e:
                errors.append(str(e))
        return ok, errors + list(self._conflicts)

    # -- the mapping ----------------------------------------------------------------

    def __setitem__(self, name: str, cls: type[T]) -> None:
        if self._loaded.get(name) is cls:   # putting back what the metadata says
            self._overrides.pop(name, None)
            return
        self._overrides[name] = cls

    def __delitem__(self, name: str) -> None:
        if name in self._overrides:
            del self._overrides[name]
        elif name in self._entries():
            raise KeyError(f"{self.what} {name!r} is registered by {self.source(name)}; "
                           f"only in-process registrations can be removed")
        else:
            raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self._overrides or name in self._entries()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._entries()) | set(self._overrides)))

    def __len__(self) -> int:
        return len(set(self._entries()) | set(self._overrides))

    def known(self) -> str:
        """The registered names, comma-separated, for "unknown ..." messages."""
        return ", ".join(self) or "none: is remote-hw installed (pip install -e .)?"
