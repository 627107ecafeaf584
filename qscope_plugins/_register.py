"""Registration with SAELens, TransformerLens and nnsight: explicit, idempotent, lazy, never silent.

``import qscope_plugins`` imports none of the frameworks (nor torch). It registers with the
frameworks already imported, and puts one small finder at the front of ``sys.meta_path`` that
does the same for each other framework right after its first import finishes, whether the user
imports it, another framework does (SAELens imports TransformerLens), or an integration module
does (``from sae_lens import SAE`` and ``import transformer_lens.model_bridge`` import the
package first, so they count too). The finder looks only at the names of the frameworks and of
this package's own submodules; for those it asks the finders behind it for the spec (exactly
what the import system would do) and wraps the loader, so it never changes what is imported.

Registration waits until no watched module is executing in the importing thread, so a framework
imported halfway through another one, or through one of this package's modules, is registered
once everything it builds on is complete; every integration runs in ``INTEGRATIONS`` order.

Never silent: an installed framework that cannot be registered (outside its tested window in
``_versions``, an integration module that fails to import, a ``register()`` that raises) gives
one :class:`RegistrationWarning` naming it, its version and the reason, and is not patched.
Nothing here ever raises into the user's ``import``; :func:`registration_status` shows the state,
with what went through each framework's extension points (``registered``) apart from the names
replaced where it has none (``patched``). :func:`unregister` undoes both, exactly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from . import _versions
from .integrations import INTEGRATIONS, REQUIRES

log = logging.getLogger(__name__)

_PACKAGE = __name__.rpartition(".")[0]


class RegistrationWarning(UserWarning):
    """An installed framework qscope-plugins did not register with; the message names it, its version and why."""


@dataclass
class FrameworkStatus:
    """Where registration with one framework stands (plain data, for ``qscope doctor`` and users).

    Fields:

    - ``framework``: the import name (``"sae_lens"``, ``"transformer_lens"``, ``"nnsight"``).
    - ``distribution``: its name on PyPI (``"sae-lens"``).
    - ``version``: the installed version, ``None`` when not installed.
    - ``window``: the tested window of the distribution, e.g. ``">=6.54,<6.55"``.
    - ``in_window``: whether the framework *and* every distribution its integrations patch
      against (``integrations.REQUIRES``: torch, transformers) are inside their windows;
      ``None`` when the framework is not installed.
    - ``imported``: whether the framework is imported in this process (registration happens then).
    - ``state``: ``"not installed"``, ``"not imported"`` (installed; registers on first import),
      ``"registered"``, ``"refused"`` (outside the window: not patched), ``"failed"`` or
      ``"unregistered"`` (:func:`unregister` undid it; only an explicit :func:`register` redoes it).
    - ``registered``: ``{integration name: [what it registered]}`` (``INTEGRATIONS`` names:
      ``transformer_lens`` has two, ``transformer_lens`` and ``bridge``), for those that registered.
    - ``patched``: ``{integration name: [attributes replaced]}`` (``"module.Class.name"``): the
      patches made where the framework has no extension point, each undone by :func:`unregister`.
    - ``error``: the reason given in the :class:`RegistrationWarning`, ``None`` when there was none.
    """

    framework: str
    distribution: str
    version: str | None
    window: str
    in_window: bool | None
    imported: bool
    state: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    patched: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Integration:
    name: str  # the integration's own name (``INTEGRATIONS``)
    framework: str  # import name of the framework it registers with
    module: str  # the module whose ``register()`` runs
    requires: tuple[str, ...]  # distributions whose tested window it needs
    state: str = "pending"  # pending | registered | refused | failed | unregistered
    items: list[str] = field(default_factory=list)
    error: str | None = None
    seen: frozenset[str] = frozenset()  # frameworks loaded when it last ran (re-run when that grows)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then tells the registry; gives the module its real loader back first."""

    def __init__(self, loader: Any, registry: Registry, name: str) -> None:
        self._loader, self._registry, self._name = loader, registry, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._registry._executing(self._name, module, self._loader.exec_module)


class _ImportHook(importlib.abc.MetaPathFinder):
    """The one ``sys.meta_path`` entry: wraps the loaders of the frameworks and of this package's modules."""

    _qscope_import_hook = True

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def find_spec(self, fullname, path=None, target=None):
        registry = self._registry
        if fullname not in registry.frameworks and not fullname.startswith(registry.own_prefix):
            return None
        try:
            later = sys.meta_path[sys.meta_path.index(self) + 1 :]
        except ValueError:
            return None
        for finder in later:
            find = getattr(finder, "find_spec", None)
            if find is None:  # a legacy finder: leave this import to the import system, unwatched
                return None
            spec = find(fullname, path, target)  # an ImportError here is the one the import would raise
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, _Loader):
            spec.loader = _Loader(loader, registry, fullname)
        return spec


class Registry:
    """Registration state for one table of integrations (the package has one; tests build others)."""

    def __init__(
        self,
        integrations: list[tuple[str, str, str, tuple[str, ...]]],
        own_package: str,
        distributions: dict[str, str],
    ) -> None:
        self.integrations = [_Integration(*row) for row in integrations]
        self.frameworks = {i.framework: distributions[i.framework] for i in self.integrations}
        self.own_prefix = own_package + "."
        self._versions: dict[str, str | None] = {}
        self._warned: set[tuple[str, str]] = set()
        self._depth = threading.local()
        self._count_lock = threading.Lock()  # held briefly, never across an import
        self._run_lock = threading.RLock()  # held across the imports registration does
        self._in_exec: dict[str, int] = {}
        self._running = False
        self._dirty = False

    # ------------------------------------------------------------ the hook
    def install_hook(self) -> None:
        """Put this registry's finder first on ``sys.meta_path``, replacing any earlier one; idempotent."""
        self.remove_hook()
        sys.meta_path.insert(0, _ImportHook(self))

    @staticmethod
    def remove_hook() -> None:
        """Take every qscope-plugins finder off ``sys.meta_path`` (patches already made stay); idempotent."""
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_qscope_import_hook", False)]

    def _executing(self, name: str, module: ModuleType, execute: Callable[[ModuleType], None]) -> None:
        depth = getattr(self._depth, "value", 0)
        self._depth.value = depth + 1
        with self._count_lock:
            self._in_exec[name] = self._in_exec.get(name, 0) + 1
        try:
            execute(module)
        finally:
            with self._count_lock:
                self._in_exec[name] -= 1
            self._depth.value = depth
            if depth == 0:
                self.notify()

    def _loaded(self, framework: str) -> bool:
        """Imported, and not executing in any thread."""
        if sys.modules.get(framework) is None:
            return False
        with self._count_lock:
            return not self._in_exec.get(framework)

    # ------------------------------------------------------------ registering
    def notify(self) -> None:
        """Register with every framework that is now imported; never raises (failures become warnings)."""
        while True:
            self._dirty = True
            if not self._run_lock.acquire(blocking=False):
                return  # another thread is registering: it sees the flag and runs once more
            try:
                if self._running:
                    return  # an import made by registration itself: the running loop picks it up
                self._running = True
                try:
                    while self._dirty:
                        self._dirty = False
                        self._pass(explicit=False, done={})
                except Exception as err:  # noqa: BLE001 - an import must never fail because of us
                    warnings.warn(f"qscope-plugins: registration failed: {err!r}", RegistrationWarning, stacklevel=2)
                finally:
                    self._running = False
            finally:
                self._run_lock.release()
            if not self._dirty:
                return

    def register(self, frameworks: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Import and register every installed framework (or those named); ``{integration: [registered now]}``."""
        self._check_names(frameworks)
        done: dict[str, list[str]] = {}
        with self._run_lock:
            nested, self._running = self._running, True
            try:
                self._pass(explicit=True, done=done, frameworks=frameworks)
                while self._dirty and not nested:
                    self._dirty = False
                    self._pass(explicit=False, done={})
            finally:
                self._running = nested
        return done

    def unregister(self, frameworks: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Undo every integration (or those of the frameworks named), last first; ``{integration: [undone]}``.

        Each one is then ``"unregistered"``: later imports leave it alone until :meth:`register`.
        """
        self._check_names(frameworks)
        done: dict[str, list[str]] = {}
        with self._run_lock:
            for integration in reversed(self.integrations):
                if frameworks and integration.framework not in frameworks:
                    continue
                module = sys.modules.get(integration.module)
                undo = getattr(module, "unregister", None)
                done[integration.name] = list(undo()) if undo is not None else []
                if integration.state != "refused":
                    integration.state, integration.error = "unregistered", None
                integration.items, integration.seen = [], frozenset()
        return done

    def _check_names(self, frameworks: tuple[str, ...]) -> None:
        unknown = [f for f in frameworks if f not in self.frameworks]
        if unknown:
            raise ValueError(f"unknown framework {unknown[0]!r}: expected one of {', '.join(sorted(self.frameworks))}")

    def _pass(self, explicit: bool, done: dict[str, list[str]], frameworks: tuple[str, ...] = ()) -> None:
        for integration in self.integrations:
            framework = integration.framework
            if frameworks and framework not in frameworks:
                continue
            if explicit:
                if not self._installed(framework):
                    done[integration.name] = []
                    continue
            elif not self._loaded(framework):
                continue
            elif integration.state in ("refused", "failed", "unregistered"):
                continue
            elif integration.state == "registered" and integration.seen == self._loaded_frameworks():
                continue
            done[integration.name] = self._attempt(integration)
            integration.seen = self._loaded_frameworks()

    def _loaded_frameworks(self) -> frozenset[str]:
        return frozenset(f for f in self.frameworks if self._loaded(f))

    def _attempt(self, integration: _Integration) -> list[str]:
        if integration.state == "refused":
            return []
        reason = self._refusal(integration)
        if reason is not None:
            integration.state, integration.error = "refused", reason
            self._warn(integration.framework, reason)
            return []
        try:
            module = importlib.import_module(integration.module)
            items = list(module.register())
        except ImportError as err:  # a dependency missing, or a name the framework no longer has
            reason = f"{integration.module} could not be imported ({type(err).__name__}: {err})"
        except Exception as err:  # noqa: BLE001 - reported as a warning, the framework stays usable
            reason = f"{integration.module}.register() raised {type(err).__name__}: {err}"
        else:
            integration.state, integration.error = "registered", None
            integration.items += [item for item in items if item not in integration.items]
            log.debug("registered %s: %s", integration.name, items)
            return items
        integration.state, integration.error = "failed", reason
        self._warn(integration.framework, reason)
        return []

    def _refusal(self, integration: _Integration) -> str | None:
        for package in integration.requires:
            version = self._version(package)
            if version is not None and not _versions.in_window(package, version):
                return _versions.outside_window(package, version)
        return None

    def _warn(self, framework: str, reason: str) -> None:
        if (framework, reason) in self._warned:
            return
        self._warned.add((framework, reason))
        distribution = self.frameworks[framework]
        version = self._version(distribution) or "version unknown"
        warnings.warn(
            f"qscope-plugins did not register with {framework} ({distribution} {version}): {reason}",
            RegistrationWarning,
            stacklevel=2,
        )

    def _version(self, distribution: str) -> str | None:
        if distribution not in self._versions:
            try:
                self._versions[distribution] = _versions.installed(distribution)
            except Exception:  # noqa: BLE001 - broken metadata: treated as unknown
                self._versions[distribution] = None
        return self._versions[distribution]

    def _installed(self, framework: str) -> bool:
        if self._version(self.frameworks[framework]) is not None or sys.modules.get(framework) is not None:
            return True
        try:  # importable without distribution metadata (a source checkout on sys.path)
            return importlib.util.find_spec(framework) is not None
        except (ImportError, ValueError):  # a server's import hook may refuse even to look
            return False

    # ------------------------------------------------------------ status
    @staticmethod
    def _patched(integration: _Integration) -> list[str]:
        patched = getattr(sys.modules.get(integration.module), "patched", None)
        return list(patched()) if patched is not None else []

    def status(self) -> dict[str, FrameworkStatus]:
        result = {}
        for framework, distribution in self.frameworks.items():
            mine = [i for i in self.integrations if i.framework == framework]
            version = self._version(distribution)
            requires = sorted({p for i in mine for p in i.requires})
            in_window = None
            if version is not None:
                in_window = all(
                    self._version(p) is None or _versions.in_window(p, self._version(p)) for p in requires
                )
            states = {i.state for i in mine}
            imported = sys.modules.get(framework) is not None
            if "refused" in states:
                state = "refused"
            elif "failed" in states:
                state = "failed"
            elif states == {"registered"}:
                state = "registered"
            elif "unregistered" in states:
                state = "unregistered"
            elif version is None and not imported:
                state = "not installed"
            else:
                state = "not imported"
            window = _versions.WINDOWS.get(distribution)
            result[framework] = FrameworkStatus(
                framework=framework,
                distribution=distribution,
                version=version,
                window=str(window) if window is not None else "",
                in_window=in_window,
                imported=imported,
                state=state,
                registered={i.name: list(i.items) for i in mine if i.state == "registered"},
                error="; ".join(i.error for i in mine if i.error) or None,
                patched={i.name: self._patched(i) for i in mine if i.state == "registered"},
            )
        return result


REGISTRY = Registry(
    [(name, framework, f"{_PACKAGE}.integrations.{name}", REQUIRES[name]) for name, framework in INTEGRATIONS],
    own_package=_PACKAGE,
    distributions=_versions.FRAMEWORKS,
)


def register(*frameworks: str) -> dict[str, list[str]]:
    """Register Qwen-Scope models and SAEs with every installed framework (or those named), importing each.

    ``frameworks`` are import names (``"sae_lens"``, ``"transformer_lens"``, ``"nnsight"``).
    Returns ``{integration: [what it registered]}``; an integration whose framework is not
    installed maps to an empty list, and so does one that was refused or failed (it warned,
    once, with a :class:`RegistrationWarning`). Calling this twice registers nothing twice:
    each integration keeps its own "already done" state. You rarely need it: ``import
    qscope_plugins`` registers with each framework as soon as that framework is imported;
    after :func:`unregister` it is the way back.
    """
    return REGISTRY.register(frameworks)


def unregister(*frameworks: str) -> dict[str, list[str]]:
    """Undo the registration with every framework (or those named): the opposite of :func:`register`.

    Every replaced name gets its original object back, and every class, converter and module
    registered is removed from the framework's registries (an entry this package replaced gets
    the framework's own back). Returns ``{integration: [what was undone]}``; idempotent. The
    frameworks are left alone afterwards, even on later imports, until :func:`register` is called.
    """
    return REGISTRY.unregister(frameworks)


def registration_status() -> dict[str, FrameworkStatus]:
    """``{framework import name: FrameworkStatus}`` for SAELens, TransformerLens and nnsight.

    Reads state only: it imports nothing and registers nothing (call :func:`register` first
    to register every installed framework). See :class:`FrameworkStatus` for the fields.
    """
    return REGISTRY.status()


def activate() -> None:
    """What ``import qscope_plugins`` does: register with what is imported, hook the rest."""
    REGISTRY.install_hook()
    REGISTRY.notify()
