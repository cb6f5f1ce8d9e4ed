"""One progress display per command: a bar on a terminal, one line per item in a log.

A batch ``attnctl inpaint --manifest`` used to draw diffusers' per-step bar inside its
per-image bar: in a log file, hundreds of cursor-up sequences. Both cases are run for real,
the terminal one on a pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from attnctl.cli import main
from harmonpaint_recipe.progress import LineProgress, progress, step_bar_config

ITEMS = 3


@pytest.fixture
def manifest(files):
    rows = [{"image": "img.png", "mask": "mask.png", "prompt": f"a cat {i}", "seed": i, "name": f"item{i}"}
            for i in range(ITEMS)]
    (files / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files / "items.jsonl"


def _argv(manifest, out):
    return ["inpaint", "--recipe", "sdi", "--manifest", str(manifest), "--out-dir", str(out),
            "model.pretrained=tiny", "sampler.steps=3"]


def test_a_batch_in_a_log_prints_one_line_per_item(manifest, capsys):
    assert main(_argv(manifest, manifest.parent / "res")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = [l for l in err.splitlines() if l.startswith("inpaint:")]
    assert [l.split(" (")[0] for l in lines] == [f"inpaint: {i}/{ITEMS} image" for i in range(1, ITEMS + 1)]
    assert "left)" in lines[0] and "left" not in lines[-1]  # an estimate until the last item


def test_a_batch_on_a_terminal_draws_one_bar(manifest):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "attnctl", *_argv(manifest, manifest.parent / "tty")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert server.wait(timeout=300) == 0
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[A" not in shown  # no bar drawn inside another
    frames = [f for f in re.split(r"[\r\n]+", shown) if "|" in f and "%" in f]
    assert frames and all(f.lstrip().startswith("inpaint:") for f in frames), frames[:5]
    assert f"{ITEMS}/{ITEMS}" in frames[-1]


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert isinstance(progress(range(2), desc="x"), LineProgress)
    assert step_bar_config(own_bar=False) == {"disable": True}
    monkeypatch.setattr(sys, "stderr", Stream(True))
    bar = progress(range(2), desc="x")
    assert type(bar).__name__.startswith("tqdm")
    bar.close()
    assert step_bar_config(own_bar=False) == {"disable": False}
    assert step_bar_config(own_bar=True) == {"disable": True}


def test_line_progress_counts_updates_and_logs(capsys):
    bar = LineProgress(desc="bench tiny", total=4, unit="step")
    bar.set_postfix_str("round 1/2, attnctl")
    bar.update(1)
    bar.write("a log line")
    bar.update(3)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("bench tiny: 1/4 step (") and lines[0].endswith("left) [round 1/2, attnctl]")
    assert lines[1] == "a log line" and lines[2].startswith("bench tiny: 4/4 step (")
