#!/usr/bin/env python
"""Run diffusers' own fast pipeline tests plain and with attnctl attached idle; compare call by call.

Two pytest runs in subprocesses over the same test files, with the plugin
``scripts/diffusers_fast_tests/attnctl_difftests.py``: plain, then with every pipeline call
inside ``with attnctl.attach(pipe, {}):``. Each run records per test id its outcome and, for
every pipeline call in it, a digest of the output (sha256 of each array's bytes, shape, dtype)
and the arrays (a bounded .npz). The comparison prints a table (test, plain outcome, attached
outcome, calls, identical calls, max |diff|) and a summary line, and exits non-zero when any
outcome or output differs, or an attach was refused.

diffusers' tests are not in its wheel; pass the ``tests`` folder of a diffusers source tree
at (or near) the installed version with ``--diffusers-tests`` (how to get one:
scripts/diffusers_fast_tests/README.md). Only ``tests/``: with a ``src/`` beside it,
diffusers' tests/conftest.py would import that source instead of the installed package.

    OMP_NUM_THREADS=1 python scripts/diffusers-fast-tests.py --diffusers-tests ~/diffusers-tests/tests \\
        tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py --report report.md

Default test files: the SD3 inpaint and FLUX fill fast tests. ``--control-perturb``: the
attached run adds 1e-3 to one attention site's output through attnctl's wrapper, a control the
comparison must catch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN_DIR = HERE / "diffusers_fast_tests"
DEFAULT_FILES = [
    "tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3_inpaint.py",
    "tests/pipelines/flux/test_pipeline_flux_fill.py",
]
#: deselected unless --all-classes: diffusers' slow/nightly classes (skipped without an accelerator anyway)
FAST_ONLY = "not Integration and not SlowTests and not NightlyTests"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", default=None,
                   help="test files or node ids, relative to the tests folder's parent (tests/pipelines/...), "
                        "to the tests folder, or absolute (default: the SD3 inpaint and FLUX fill fast tests)")
    p.add_argument("--diffusers-tests", type=Path, default=None, metavar="PATH",
                   help="diffusers' tests/ folder (env DIFFUSERS_TESTS); see the README for how to get it")
    p.add_argument("--fetch-sdist", action="store_true",
                   help="download the installed diffusers version's sdist from PyPI (pip download) into "
                        "--cache and use its tests/ (only where the sdist ships tests/pipelines)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "attnctl-diffusers-tests",
                   help="where --fetch-sdist puts the sdist and its tests (default ~/.cache/attnctl-diffusers-tests)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (combined with the fast-only filter)")
    p.add_argument("--all-classes", action="store_true",
                   help=f"do not add the fast-only filter ({FAST_ONLY!r})")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the records (plain.json/.npz, attached.json/.npz, pytest logs); default: a temp folder")
    p.add_argument("--report", type=Path, default=None, help="also write the table as Markdown here")
    p.add_argument("--control-perturb", action="store_true",
                   help="control that must fail: the attached run perturbs one attention site by 1e-3 through attnctl")
    p.add_argument("--standins", choices=("auto", "always", "off"), default="auto",
                   help="offline stand-ins for hf-internal-testing ids (default auto: hub cache if present, else stand-in)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run (default 3600)")
    p.add_argument("--npz-max-mb", type=float, default=64.0, help="bound on the arrays each run keeps (MiB)")
    p.add_argument("--pytest-arg", action="append", default=[], help="extra argument for both pytest runs (repeatable)")
    p.add_argument("--compare-only", action="store_true", help="skip the runs; compare the records already in --out")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the tests folder
def die(message: str) -> None:
    """A setup problem (no tests folder, no such file): exit 2, apart from 1 = "differs"."""
    print(message, file=sys.stderr)
    sys.exit(2)


def fetch_sdist(cache: Path) -> Path:
    """Download diffusers==<installed> sdist with pip and extract its tests/; error if it has none."""
    version = metadata.version("diffusers")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"diffusers-{version}-sdist"
    tests = target / "tests"
    if (tests / "pipelines").is_dir():
        return tests
    dl = cache / "downloads"
    subprocess.run([sys.executable, "-m", "pip", "download", f"diffusers=={version}", "--no-binary", ":all:",
                    "--no-deps", "-q", "-d", str(dl)], check=True)
    sdists = sorted(dl.glob(f"diffusers-{version}.tar.gz"))
    if not sdists:
        die(f"pip download left no diffusers-{version}.tar.gz in {dl}")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
        names = [m.name.split("/", 1)[1] for m in members]
        if not any(n.startswith("tests/pipelines/") for n in names):
            die(
                f"the diffusers {version} sdist ships no tests/pipelines (it has: {', '.join(names) or 'no tests'}); "
                "get tests/ from diffusers' git repository at the release tag instead (see "
                "scripts/diffusers_fast_tests/README.md) and pass it with --diffusers-tests"
            )
        for m in members:
            m.name = m.name.split("/", 1)[1]
            tar.extract(m, target, filter="data")
    return tests


def resolve_tests(args) -> Path:
    if args.fetch_sdist:
        return fetch_sdist(args.cache)
    tests = args.diffusers_tests or (Path(os.environ["DIFFUSERS_TESTS"]) if os.environ.get("DIFFUSERS_TESTS") else None)
    if tests is None:
        die("no diffusers tests folder: pass --diffusers-tests PATH (or set DIFFUSERS_TESTS, or use "
                         "--fetch-sdist where the sdist ships tests); see scripts/diffusers_fast_tests/README.md")
    tests = tests.resolve()
    if tests.name != "tests" and (tests / "tests").is_dir():
        tests = tests / "tests"
    if not (tests / "conftest.py").is_file() or not (tests / "pipelines").is_dir():
        die(f"{tests}: not diffusers' tests folder (expected conftest.py and pipelines/ in it)")
    if (tests.parent / "src" / "diffusers").is_dir():
        print(f"warning: {tests.parent / 'src'} exists; diffusers' tests/conftest.py puts it on sys.path, so the "
              "tests would run that source, not the installed diffusers", file=sys.stderr)
    return tests


def node_arg(tests: Path, spec: str) -> str:
    """A test file/node id as pytest gets it from the tests folder's parent."""
    path, sep, rest = spec.partition("::")
    candidates = [Path(path)] if Path(path).is_absolute() else [tests.parent / path, tests / path]
    for c in candidates:
        if c.exists():
            return str(c.resolve().relative_to(tests.parent)) + sep + rest
    die(f"{spec}: no such test file under {tests.parent}")


# --------------------------------------------------------------------------- running
def run_pytest(tests: Path, nodes: list[str], mode: str, args, out: Path) -> tuple[dict | None, float, int]:
    record = out / f"{mode}.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "attnctl_difftests", "-p", "no:cacheprovider", "-q",
           "--attnctl-record", str(record), "--attnctl-standins", args.standins,
           "--attnctl-npz-max-mb", str(args.npz_max_mb), *nodes]
    keyword = " and ".join(f"({k})" for k in ([] if args.all_classes else [FAST_ONLY]) + ([args.keyword] if args.keyword else []))
    if keyword:
        cmd += ["-k", keyword]
    if mode != "plain":
        cmd.append("--attnctl-idle")
        if args.control_perturb:
            cmd.append("--attnctl-control-perturb")
    cmd += args.pytest_arg
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(PLUGIN_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = out / f"{mode}.log"
    print(f"[{mode}] {' '.join(cmd[1:])}\n[{mode}] cwd {tests.parent}; log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(cmd, cwd=tests.parent, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
    elapsed = time.perf_counter() - start
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    print(f"[{mode}] pytest exit {rc} in {elapsed:.1f} s: {tail[0]}", flush=True)
    data = json.loads(record.read_text(encoding="utf-8")) if record.exists() else None
    return data, elapsed, rc


# --------------------------------------------------------------------------- comparing
def load_npz(out: Path, data: dict):
    import numpy as np

    path = out / data["npz"]
    return np.load(path) if path.exists() else None


def max_abs_diff(a_call: dict, b_call: dict, a_npz, b_npz) -> float | None:
    """Largest |a - b| over the leaves both calls kept with the same path and shape (None: none comparable)."""
    import numpy as np

    worst = None
    b_leaves = {leaf["path"]: leaf for leaf in b_call.get("leaves", [])}
    for leaf in a_call.get("leaves", []):
        other = b_leaves.get(leaf["path"])
        if other is None or "sha256" not in leaf or "sha256" not in other:
            continue
        if leaf["shape"] != other["shape"]:
            return math.inf
        if leaf["sha256"] == other["sha256"] and leaf["dtype"] == other["dtype"]:
            diff = 0.0
        elif leaf.get("npz") and other.get("npz") and a_npz is not None and b_npz is not None:
            a = np.asarray(a_npz[leaf["npz"]], dtype=np.float64)
            b = np.asarray(b_npz[other["npz"]], dtype=np.float64)
            nan_a, nan_b = np.isnan(a), np.isnan(b)
            if not np.array_equal(nan_a, nan_b):
                diff = math.inf
            else:
                finite = ~nan_a
                diff = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
        else:
            continue
        worst = diff if worst is None else max(worst, diff)
    return worst


def compare(plain: dict, attached: dict, out: Path) -> tuple[list[dict], dict]:
    p_npz, a_npz = load_npz(out, plain), load_npz(out, attached)
    rows = []
    ids = list(dict.fromkeys([*plain["tests"], *attached["tests"]]))
    for nodeid in ids:
        p = plain["tests"].get(nodeid, {"outcome": "absent", "calls": []})
        a = attached["tests"].get(nodeid, {"outcome": "absent", "calls": []})
        p_calls, a_calls = p["calls"], a["calls"]
        identical, refused, worst, notes = 0, 0, None, []
        refusals: dict[str, list[int]] = {}
        for i in range(max(len(p_calls), len(a_calls))):
            pc = p_calls[i] if i < len(p_calls) else None
            ac = a_calls[i] if i < len(a_calls) else None
            if ac is not None and ac["attach"].startswith("attach refused"):
                refused += 1
                refusals.setdefault(ac["attach"], []).append(i)
            if pc is None or ac is None:
                notes.append(f"call {i}: only in the {'attached' if pc is None else 'plain'} run")
                continue
            same = pc["digest"] == ac["digest"] and pc.get("raised") == ac.get("raised")
            if same and not ac["attach"].startswith("attach refused"):
                identical += 1
            elif not same:
                if pc.get("raised") or ac.get("raised"):
                    notes.append(f"call {i}: raised plain={pc.get('raised')} attached={ac.get('raised')}")
                else:
                    notes.append(f"call {i}: output differs ({pc['pipeline']})")
            d = max_abs_diff(pc, ac, p_npz, a_npz)
            if d is not None:
                worst = d if worst is None else max(worst, d)
        for message, calls in refusals.items():
            notes.append(f"call{'s' if len(calls) > 1 else ''} {', '.join(map(str, calls))}: {message}")
        if p["outcome"] != a["outcome"]:
            notes.append(f"plain: {p.get('message') or '-'} | attached: {a.get('message') or '-'}")
        elif p["outcome"] in ("failed", "error") and p.get("message"):
            notes.append(f"(both) {p['message']}")
        rows.append({
            "test": nodeid, "plain": p["outcome"], "attached": a["outcome"],
            "calls": max(len(p_calls), len(a_calls)), "calls_plain": len(p_calls), "calls_attached": len(a_calls),
            "identical": identical, "refused": refused, "max_abs_diff": worst, "notes": notes,
            "refusals": {m: len(c) for m, c in refusals.items()},
        })
    summary = {
        "tests": len(rows),
        "same_outcomes": sum(r["plain"] == r["attached"] for r in rows),
        "calls": sum(r["calls"] for r in rows),
        "identical": sum(r["identical"] for r in rows),
        "refused": sum(r["refused"] for r in rows),
        "plain_outcomes": _count(r["plain"] for r in rows),
        "attached_outcomes": _count(r["attached"] for r in rows),
        "refusals": {},
    }
    for r in rows:
        for m, n in r["refusals"].items():
            summary["refusals"][m] = summary["refusals"].get(m, 0) + n
    summary["differs"] = (summary["same_outcomes"] != summary["tests"] or summary["identical"] != summary["calls"]
                          or summary["refused"] > 0)
    return rows, summary


def _count(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def short_id(nodeid: str) -> str:
    path, _, rest = nodeid.partition("::")
    return f"{Path(path).name}::{rest}" if rest else Path(path).name


def fmt_diff(d) -> str:
    if d is None:
        return "-"
    if d == 0:
        return "0"
    return "inf" if math.isinf(d) else f"{d:.3g}"


def table(rows: list[dict], summary: dict, header: dict) -> tuple[str, str]:
    """(terminal text, Markdown)."""
    cols = ["test", "plain", "attached", "calls", "identical", "refused", "max |diff|"]
    body = [[short_id(r["test"]), r["plain"], r["attached"],
             str(r["calls"]) if r["calls_plain"] == r["calls_attached"] else f"{r['calls_plain']}/{r['calls_attached']}",
             str(r["identical"]), str(r["refused"]), fmt_diff(r["max_abs_diff"])] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    text = [line(cols), line(["-" * w for w in widths]), *map(line, body)]
    diffs = [(short_id(r["test"]), n) for r in rows for n in r["notes"]]
    summ = (f"{summary['tests']} tests, same outcomes {summary['same_outcomes']}, calls bit-identical "
            f"{summary['identical']} of {summary['calls']}, attach refused {summary['refused']}")
    outcome_line = (f"plain outcomes {summary['plain_outcomes']}; attached outcomes {summary['attached_outcomes']}")
    refusal_lines = [f"{n} call(s): {m}" for m, n in summary["refusals"].items()]
    text += ["", summ, outcome_line, *refusal_lines]
    if diffs:
        text += ["", "notes:"] + [f"  {t}: {n}" for t, n in diffs]
    md = [f"# diffusers fast tests, plain vs attnctl attached idle{' (control: perturbed)' if header.get('perturb') else ''}",
          "", *[f"- {k}: {v}" for k, v in header.items()], "",
          "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|",
          *["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body], "", f"**{summ}**", "",
          outcome_line, *["", *[f"- {line}" for line in refusal_lines]][: 1 + len(refusal_lines) if refusal_lines else 0]]
    if diffs:
        md += ["", "## Notes", "", *[f"- `{t}`: {n.replace('|', '/')}" for t, n in diffs]]
    return "\n".join(text), "\n".join(md) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="attnctl-difftests-"))
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if args.compare_only:
        plain = json.loads((out / "plain.json").read_text())
        attached = json.loads((out / "attached.json").read_text())
        tests = None
    else:
        tests = resolve_tests(args)
        nodes = [node_arg(tests, f) for f in (args.files or DEFAULT_FILES)]
        plain, times["plain"], _ = run_pytest(tests, nodes, "plain", args, out)
        attached, times["attached"], _ = run_pytest(tests, nodes, "attached", args, out)
        if plain is None or attached is None:
            print(f"a pytest run left no record (see the logs in {out}): nothing to compare", file=sys.stderr)
            return 2
    rows, summary = compare(plain, attached, out)
    header = {
        "diffusers tests": str(tests) if tests else "(records in --out)",
        "versions": ", ".join(f"{k} {v}" for k, v in plain["versions"].items()),
        "stand-ins": ", ".join(f"{k}: {v}" for k, v in plain["standins"]["used"].items()) or "none used",
        "runtime": ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) or "-",
        "records": str(out),
    }
    if args.control_perturb:
        header["perturb"] = "one attention site +1e-3 through attnctl's wrapper (a control that must differ)"
    text, md = table(rows, summary, header)
    print(text)
    print(f"\nruntime: {header['runtime']}; records in {out}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(md, encoding="utf-8")
        print(f"report: {args.report}")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows, "header": header}, indent=1,
                                                 default=str), encoding="utf-8")
    print("RESULT: " + ("outcomes or outputs differ" if summary["differs"] else "no difference"))
    return 1 if summary["differs"] else 0


if __name__ == "__main__":
    sys.exit(main())
