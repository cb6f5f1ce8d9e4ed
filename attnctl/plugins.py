"""A typed facade over pluggy: discovery, validation and planning of strategies."""

from __future__ import annotations

import os
import warnings
from importlib import metadata
from typing import Any, Iterable, Mapping

import pluggy

from attnctl import hookspecs
from attnctl.errors import ConfigError, PluginWarning, did_you_mean
from attnctl.params import StrategySpec

ENTRY_POINT_GROUP = "attnctl.strategies"
#: set to 1 to load only attnctl's own built-in strategies, not third-party plugins
DISABLE_AUTOLOAD_ENV = "ATTNCTL_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "attnctl"

hookimpl = pluggy.HookimplMarker("attnctl")
_DEFAULT_MANAGERS: dict[tuple, "StrategyManager"] = {}


class StrategyManager:
    """Collects strategy plugins and answers questions about them.

    Args:
        plugins: extra plugin objects/modules to register (e.g. a test's toy strategy).
        autoload: load plugins from the ``attnctl.strategies`` entry points. ``None`` reads
            ``ATTNCTL_DISABLE_PLUGIN_AUTOLOAD``: when it is set, only attnctl's own entry
            points (the built-in strategies) are loaded. ``False`` loads none.
    """

    @classmethod
    def default(cls) -> StrategyManager:
        """The manager of the installed plugins, shared by every caller that passes none.

        Loading recipes, attaching and listing strategies reuse one manager as long as the
        installed entry points (and ``ATTNCTL_DISABLE_PLUGIN_AUTOLOAD``) stay the same.
        """
        key = (os.environ.get(DISABLE_AUTOLOAD_ENV, ""),
               tuple(sorted((ep.name, ep.value) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))))
        if key not in _DEFAULT_MANAGERS:
            _DEFAULT_MANAGERS.clear()
            _DEFAULT_MANAGERS[key] = cls()
        return _DEFAULT_MANAGERS[key]

    def __init__(self, plugins: Iterable[Any] = (), autoload: bool | None = None):
        #: entry-point name -> why that plugin could not be loaded
        self.broken: dict[str, str] = {}
        self.pm = pluggy.PluginManager("attnctl")
        self.pm.add_hookspecs(hookspecs)
        if autoload is None or autoload:
            own_only = autoload is None and os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0")
            self._load_entry_points(own_only=own_only)
        for plugin in plugins:
            self.register(plugin)
        self._specs: dict[str, StrategySpec] | None = None
        self._providers: dict[str, str] = {}

    def _load_entry_points(self, own_only: bool) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if own_only and (ep.dist is None or ep.dist.name != OWN_DISTRIBUTION):
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                self.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not take the others down
                if self.pm.get_plugin(ep.name) is not None:
                    self.pm.unregister(name=ep.name)
                self._report_broken(ep, exc)

    def _report_broken(self, ep: metadata.EntryPoint, exc: Exception) -> None:
        dist = ep.dist.name if ep.dist is not None else "an unknown package"
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.broken[ep.name] = f"plugin '{ep.name}' ({ep.value}, from {dist}) failed to load: {reason}"
        warnings.warn(
            f"attnctl: {self.broken[ep.name]}; its strategies are unavailable, the others work. Fix or "
            f"uninstall {dist}, or set {DISABLE_AUTOLOAD_ENV}=1 to load only attnctl's own strategies",
            PluginWarning,
            stacklevel=3,
        )

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin and check that every hook it implements is a known spec."""
        if plugin in self.pm.get_plugins():
            return
        self.pm.register(plugin, name=name)
        self.check_pending()
        self._specs = None

    def check_pending(self) -> None:
        """Fail loudly on a hook implementation whose name matches no spec (a typo)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"strategy plugin error: {exc}; hook names must match attnctl.hookspecs") from None

    @property
    def hook(self):
        """The pluggy hook caller (``manager.hook.attnctl_plan(...)``)."""
        return self.pm.hook

    def strategies(self) -> dict[str, StrategySpec]:
        """All discovered strategies by name (sorted)."""
        if self._specs is None:
            specs: dict[str, StrategySpec] = {}
            self._providers = {}
            for impl in self.pm.hook.attnctl_add_strategies.get_hookimpls():
                for spec in impl.function() or ():
                    if spec.name in specs:
                        raise ConfigError(f"two plugins provide a strategy named '{spec.name}'; rename one")
                    specs[spec.name] = spec
                    self._providers[spec.name] = impl.plugin_name
            self._specs = dict(sorted(specs.items()))
        return self._specs

    def processor_adapters(self) -> list[Mapping[Any, Any]]:
        """The processor adapter tables every plugin provides (``attnctl_add_processor_adapters``)."""
        return [table for table in self.pm.hook.attnctl_add_processor_adapters() if table]

    def backbones(self) -> list[Any]:
        """The backbones every plugin provides (``attnctl_add_backbones``), in one list."""
        return [b for found in self.pm.hook.attnctl_add_backbones() if found for b in found]

    def provider(self, name: str) -> str:
        """Name of the plugin that provides strategy ``name``."""
        self.strategies()
        return self._providers[name]

    def spec(self, name: str, where: str) -> StrategySpec:
        """The spec of strategy ``name``; ``ConfigError`` naming ``where`` if unknown."""
        specs = self.strategies()
        if name not in specs:
            broken = "".join(f"; note: {why}" for why in self.broken.values())
            raise ConfigError(
                f"unknown strategy '{name}' in {where}{did_you_mean(name, specs)}; "
                f"available strategies: {', '.join(specs) or '(none)'} (see `attnctl strategies`){broken}"
            )
        return specs[name]


def strategies_config(config: Any, section: str = "strategies") -> Mapping[str, Mapping[str, Any]]:
    """Extract the ``strategies`` (or ``probes``) mapping from a config (dict, OmegaConf or mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"attach config must be a mapping with a 'strategies' key, got {type(config).__name__}")
    instances = config.get(section, {}) or {}
    if not isinstance(instances, Mapping):
        raise ConfigError(f"config '{section}' must be a mapping of instance name -> settings (not a list)")
    return instances
