"""pytest plugin: run diffusers' own pipeline tests plain or with attnctl attached idle, and record.

Load it with ``-p attnctl_difftests`` (its folder on ``PYTHONPATH``; the driver script
``scripts/diffusers-fast-tests.py`` does this). Options:

``--attnctl-idle``
    every outermost ``DiffusionPipeline`` subclass ``__call__`` runs inside
    ``with attnctl.attach(pipe, {}):``; if the attach raises, the call is recorded as
    ``attach refused: <message>`` and runs unattached so the test goes on.
``--attnctl-control-perturb``
    (with ``--attnctl-idle``) a control that must be caught: after attaching, the first
    attention site's wrapped processor (attnctl's ``ControlledProcessor.original``) adds 1e-3
    to its output, so the change goes in through attnctl's own wrapper.
``--attnctl-record PATH``
    write per test id the outcome and, per pipeline call, a digest of its output
    (sha256 of every array's bytes with its shape and dtype) to PATH (JSON), and the arrays
    themselves to PATH with suffix ``.npz`` (bounded by ``--attnctl-npz-max-mb``).
``--attnctl-standins auto|always|off``
    the offline stand-ins of ``standins.py`` for the hf-internal-testing ids (default auto:
    the hub or its cache when it has the repository, else the stand-in).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

_PLUGIN_NAME = "attnctl-difftests-recorder"
PERTURB = 1e-3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attnctl-difftests", "attnctl: diffusers' pipeline tests plain vs attached")
    group.addoption("--attnctl-idle", action="store_true", help="run every pipeline call inside attnctl.attach(pipe, {})")
    group.addoption("--attnctl-control-perturb", action="store_true",
                    help="with --attnctl-idle: perturb one attention site's output by 1e-3 through attnctl's wrapper")
    group.addoption("--attnctl-record", default=None, metavar="PATH",
                    help="write outcomes and call digests (JSON) to PATH, arrays to PATH.npz")
    group.addoption("--attnctl-standins", default="auto", choices=("auto", "always", "off"),
                    help="offline stand-ins for hf-internal-testing tokenizers/configs (default auto)")
    group.addoption("--attnctl-npz-max-mb", type=float, default=64.0,
                    help="bound on the arrays kept in the .npz (MiB, default 64)")
    group.addoption("--attnctl-npz-max-array-mb", type=float, default=8.0,
                    help="arrays larger than this are digested but not kept (MiB, default 8)")


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("--attnctl-standins")
    patched = []
    if mode != "off":
        import standins

        patched = standins.install(mode)
    recorder = Recorder(config, patched)
    config.pluginmanager.register(recorder, _PLUGIN_NAME)
    recorder.install()


# --------------------------------------------------------------------------- digests
def _to_numpy(obj: Any):
    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover - diffusers needs torch
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        dtype = str(t.dtype).replace("torch.", "")
        try:
            arr = t.numpy()
        except TypeError:  # bfloat16, float8: no numpy dtype; digest their float32 values
            arr = t.float().numpy()
        return np.ascontiguousarray(arr), dtype
    if isinstance(obj, np.ndarray):
        return np.ascontiguousarray(obj), str(obj.dtype)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(obj, Image.Image):
        arr = np.asarray(obj)
        return np.ascontiguousarray(arr), f"PIL:{obj.mode}"
    return None


def leaves(obj: Any, path: str = "out"):
    """(path, object) for every array-like or plain value in a pipeline's output."""
    if _to_numpy(obj) is not None:
        yield path, obj
    elif isinstance(obj, dict):  # BaseOutput is an OrderedDict
        for key, value in obj.items():
            yield from leaves(value, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def _plain(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


class Recorder:
    def __init__(self, config: pytest.Config, patched: list[str]):
        self.config = config
        self.idle = bool(config.getoption("--attnctl-idle"))
        self.perturb = bool(config.getoption("--attnctl-control-perturb"))
        if self.perturb and not self.idle:
            raise pytest.UsageError("--attnctl-control-perturb needs --attnctl-idle")
        self.record_path = config.getoption("--attnctl-record")
        self.npz_budget = int(config.getoption("--attnctl-npz-max-mb") * 2**20)
        self.npz_array_max = int(config.getoption("--attnctl-npz-max-array-mb") * 2**20)
        self.patched_classes = patched
        self.tests: dict[str, dict[str, Any]] = {}
        self.arrays: dict[str, Any] = {}
        self.npz_bytes = 0
        self.current: str | None = None
        self.local = threading.local()
        self.wrapped: list[str] = []

    # ------------------------------------------------------------------ wrapping
    def install(self) -> None:
        from diffusers import DiffusionPipeline

        recorder = self
        previous = DiffusionPipeline.__dict__.get("__init_subclass__")

        def __init_subclass__(cls, **kwargs):  # pipelines defined (imported) later are wrapped too
            if previous is not None:
                previous.__func__(cls, **kwargs)
            else:
                super(DiffusionPipeline, cls).__init_subclass__(**kwargs)
            recorder.wrap_class(cls)

        DiffusionPipeline.__init_subclass__ = classmethod(__init_subclass__)
        self.wrap_existing()

    def wrap_existing(self) -> None:
        from diffusers import DiffusionPipeline

        todo = [DiffusionPipeline]
        seen = set()
        while todo:
            cls = todo.pop()
            for sub in cls.__subclasses__():
                if sub not in seen:
                    seen.add(sub)
                    self.wrap_class(sub)
                    todo.append(sub)

    def wrap_class(self, cls: type) -> None:
        original = cls.__dict__.get("__call__")
        if original is None or getattr(original, "__attnctl_difftests__", False):
            return
        recorder = self

        @functools.wraps(original)  # keeps __wrapped__: tests read the call's signature
        def __call__(pipe, *args, **kwargs):
            return recorder.pipeline_call(pipe, original, args, kwargs)

        __call__.__attnctl_difftests__ = True
        cls.__call__ = __call__
        self.wrapped.append(f"{cls.__module__}.{cls.__qualname__}")

    # ------------------------------------------------------------------ one call
    def _test(self, nodeid: str | None) -> dict[str, Any]:
        key = nodeid or "<outside any test>"
        return self.tests.setdefault(key, {"outcome": None, "phases": {}, "calls": [], "message": None})

    def pipeline_call(self, pipe, original, args, kwargs):
        depth = getattr(self.local, "depth", 0)
        if depth:  # a pipeline calling a pipeline (or super().__call__): the outermost call is the one
            return original(pipe, *args, **kwargs)
        self.local.depth = depth + 1
        test = self._test(self.current)
        rec: dict[str, Any] = {"index": len(test["calls"]), "pipeline": type(pipe).__name__, "attach": "plain"}
        try:
            context: Any = contextlib.nullcontext()
            if self.idle:
                context, rec["attach"] = self._attach(pipe)
            with context:
                out = original(pipe, *args, **kwargs)
        except BaseException as exc:  # the test may expect it (pytest.raises): record and re-raise
            rec["raised"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rec["digest"] = "raised:" + type(exc).__name__
            rec["leaves"] = []
            raise
        else:
            self._digest(rec, out, test)
            return out
        finally:
            self.local.depth = depth
            test["calls"].append(rec)

    def _attach(self, pipe):
        import attnctl

        try:
            ctl = attnctl.attach(pipe, {})
        except Exception as exc:  # noqa: BLE001 - any refusal is an outcome to report
            return contextlib.nullcontext(), f"attach refused: {type(exc).__name__}: {exc}"
        if not self.perturb:
            return ctl, "attached"
        return self._perturbed(ctl), "attached+perturbed"

    @contextlib.contextmanager
    def _perturbed(self, ctl):
        """The control: one site's processor adds PERTURB to its output, inside attnctl's wrapper."""
        if not ctl.processors:  # nothing to perturb through: the control then perturbs nothing
            with ctl:
                yield ctl
            return
        name = sorted(ctl.processors)[0]
        wrapper = ctl.processors[name]
        inner = wrapper.original

        def perturbed(*args, **kwargs):
            return inner(*args, **kwargs) + PERTURB

        wrapper.original = perturbed
        try:
            yield ctl
        finally:
            wrapper.original = inner  # first: detach puts ``wrapper.original`` back on the module
            ctl.detach()

    def _digest(self, rec: dict[str, Any], out: Any, test: dict[str, Any]) -> None:
        items = []
        for path, value in leaves(out):
            converted = _to_numpy(value)
            if converted is None:
                items.append({"path": path, "value": _plain(value)})
                continue
            arr, dtype = converted
            h = hashlib.sha256()
            h.update(repr((arr.shape, arr.dtype.str)).encode())
            h.update(arr.tobytes())
            item = {"path": path, "shape": list(arr.shape), "dtype": dtype, "sha256": h.hexdigest(), "npz": None}
            if arr.nbytes > self.npz_array_max:
                item["npz_skipped"] = f"{arr.nbytes} bytes > per-array bound"
            elif self.npz_bytes + arr.nbytes > self.npz_budget:
                item["npz_skipped"] = "npz budget spent"
            else:
                key = f"a{len(self.arrays)}"
                self.arrays[key] = arr.copy()
                self.npz_bytes += arr.nbytes
                item["npz"] = key
            items.append(item)
        rec["leaves"] = items
        rec["digest"] = hashlib.sha256(
            json.dumps([{k: v for k, v in it.items() if k not in ("npz", "npz_skipped")} for it in items],
                       sort_keys=True).encode()
        ).hexdigest()

    # ------------------------------------------------------------------ pytest hooks
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self._test(item.nodeid)
        try:
            yield
        finally:
            self.current = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self._test(report.nodeid)
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        test["phases"][report.when] = outcome
        if report.failed and test["message"] is None:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = getattr(crash, "message", None) or str(report.longrepr).strip().splitlines()[-1:]
            message = message if isinstance(message, str) else " ".join(message)
            test["message"] = " ".join(message.split())[:300]  # one line, for the table's notes
        elif report.skipped and test["message"] is None and isinstance(report.longrepr, tuple):
            test["message"] = str(report.longrepr[2])[:300]
        test["outcome"] = self._combine(test["phases"])

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            test = self._test(f"{report.nodeid} (collection)")
            test["outcome"] = "error"
            test["message"] = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else None

    @staticmethod
    def _combine(phases: dict[str, str]) -> str:
        setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
        if setup == "failed":
            return "error"
        if setup in ("skipped", "xfailed"):
            return "skipped" if setup == "skipped" else "xfailed"
        outcome = call or setup or "unknown"
        if teardown == "failed":
            outcome = "error" if outcome == "passed" else f"{outcome}+teardown-error"
        return outcome

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if not self.record_path:
            return
        import numpy as np
        import attnctl
        import diffusers
        import torch
        import transformers

        path = Path(self.record_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        npz = path.with_suffix(".npz")
        np.savez(npz, **self.arrays)
        try:
            import standins

            used = dict(standins.USED)
        except ImportError:
            used = {}
        data = {
            "mode": ("attached+perturbed" if self.perturb else "attached") if self.idle else "plain",
            "exitstatus": int(exitstatus),
            "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__, "attnctl": attnctl.__version__},
            "standins": {"mode": self.config.getoption("--attnctl-standins"), "patched": self.patched_classes,
                         "used": used},
            "npz": npz.name,
            "npz_bytes": self.npz_bytes,
            "wrapped_pipelines": len(self.wrapped),
            "tests": self.tests,
        }
        path.write_text(json.dumps(data, indent=1, sort_keys=False), encoding="utf-8")
