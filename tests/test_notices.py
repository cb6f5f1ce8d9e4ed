"""Warnings on the command line: one line each, shown without importing anything, and never
the ResourceWarnings that libraries' dropped event loops and sockets raise.

The import rule matters because the garbage collector can emit a warning (from an object's
finalizer) while the import system holds a module lock: an import made by the warning hook
from there breaks the lock's bookkeeping on CPython 3.10 and 3.11 (``KeyError`` from
``_ModuleLock.acquire``). ``attnctl app`` died that way on Python 3.11.7 while Gradio built
its routes. Each check runs in a fresh interpreter, where tqdm has not yet made its lock.
"""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_showing_a_warning_imports_nothing():
    result = _python(
        "import sys, warnings\n"
        "import tqdm  # imported, as diffusers does, with no bar drawn yet\n"
        "from attnctl.notices import warnings_as_lines\n"
        "before = set(sys.modules)\n"
        "with warnings_as_lines('attnctl demo'):\n"
        "    warnings.warn('a thing to know')\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr.strip() == "attnctl demo: warning: a thing to know"


def test_a_warning_above_a_drawing_bar_is_written_through_the_bar():
    result = _python(
        "import io, sys, warnings\n"
        "from tqdm.auto import tqdm\n"
        "from attnctl.notices import warnings_as_lines\n"
        "bar = tqdm(total=3, file=sys.stderr, desc='work')\n"
        "before = set(sys.modules)\n"
        "with warnings_as_lines('attnctl demo'):\n"
        "    bar.update(1)\n"
        "    warnings.warn('above the bar')\n"
        "bar.close()\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "attnctl demo: warning: above the bar\n" in result.stderr


def test_an_unclosed_event_loop_is_not_shown():
    result = _python(
        "import asyncio, gc\n"
        "from attnctl.notices import warnings_as_lines\n"
        "with warnings_as_lines('attnctl app'):\n"
        "    loop = asyncio.new_event_loop()  # what Gradio does for its locks, and drops\n"
        "    del loop\n"
        "    gc.collect()\n"
        "    import warnings; warnings.warn('still shown')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "attnctl app: warning: still shown"


# A finalizer that warns runs at the K-th collection after the imports start; one of the K
# lands inside _ModuleLock.acquire (on 3.11.7, K = 6 with the old hook, which imported
# multiprocessing there and failed with KeyError).
_FINALIZER_DURING_IMPORT = """
import gc, sys, warnings
import tqdm
from attnctl.notices import warnings_as_lines
K = int(sys.argv[1])
count = [0]
class Tick:
    def __del__(self):
        count[0] += 1
        if count[0] == K:
            warnings.warn(f"finalizer warning {K}")
        elif count[0] < K:
            tick = Tick(); tick.cycle = tick
with warnings_as_lines("attnctl demo"):
    gc.collect()
    gc.disable()
    tick = Tick(); tick.cycle = tick; del tick
    gc.set_threshold(1)  # collect at every allocation, so a collection falls inside the import lock
    gc.enable()
    import xml.dom.minidom, http.cookiejar, email.mime.text
gc.set_threshold(700)
print("imported")
"""


def test_a_warning_from_a_finalizer_during_an_import_leaves_the_import_working():
    failed = {}
    for k in range(1, 25):
        result = subprocess.run([sys.executable, "-c", _FINALIZER_DURING_IMPORT, str(k)], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0 or result.stdout.strip() != "imported":
            failed[k] = result.stderr.strip().splitlines()[-1:]
        elif f"attnctl demo: warning: finalizer warning {k}" not in result.stderr:
            failed[k] = ["the warning was not shown"]
    assert failed == {}
