"""The README's five-minute tour as a script: its shell blocks run command by
command in bash, its Python block in Python, against a running stack.

The tour is written for a reader on the default ports with example ids. The
script changes only what a reader changes by hand: the ports (the stack's),
the example session id (the one the tour's own create returned) and `exe_…`
(the last execution id an answer named). Each command must exit 0, and the
answer shown under it (`# {...}`) is checked: every quoted name and value it
shows (except those with an ellipsis) must be in the real answer, and `{}`
must be exactly `{}`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flowport.server.settings import Settings

EXAMPLE_SESSION = "ses_01M8B06BP64VDCFG665E8DTDRW"
ELLIPSIS = "…"


@dataclass
class Command:
    """One shell command of the tour and the comment lines shown with it."""

    text: str
    shown: list[str] = field(default_factory=list)


def tour(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    return text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def commands(block: str) -> list[Command]:
    """The block's commands: continuation lines joined, here-documents kept whole, each
    with its trailing comment and the comment lines under it."""
    found: list[Command] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if found:
                found[-1].shown.append(line.lstrip()[1:].strip())
            continue
        heredoc = re.search(r"<<'(\w+)'$", line)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            found.append(Command("\n".join(lines[i - 1 : end + 1])))
            i = end + 1
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        code, _, comment = line.partition("  #")
        found.append(Command(code.strip(), [comment.strip()] if comment else []))
    return found


def shown_tokens(shown: list[str]) -> list[str]:
    """The quoted names and values an answer's comment shows, checkable ones only."""
    text = " ".join(shown)
    if '":' not in text:
        return []  # prose, not an answer
    # Every string in turn, empty ones too, so a quote never pairs with the next string's.
    return [t for t in re.findall(r'"((?:[^"\\]|\\.)*)"', text) if t and ELLIPSIS not in t]


@dataclass
class TourRun:
    """Runs the tour's commands in `workdir` against the stack of `settings`."""

    settings: Settings
    workdir: Path
    session_id: str = ""
    execution_id: str = ""
    prelude: list[str] = field(default_factory=list)

    def localize(self, text: str) -> str:
        s = self.settings
        text = re.sub(r"(localhost|127\.0\.0\.1):8080", rf"\g<1>:{s.http_port}", text)
        text = text.replace("localhost:9464", f"localhost:{s.metrics_port}")
        text = text.replace("127.0.0.1:50051", f"127.0.0.1:{s.grpc_port}")
        if self.session_id:
            text = text.replace(EXAMPLE_SESSION, self.session_id)
        return text

    def shell(self, command: Command) -> str:
        text = self.localize(command.text)
        if self.execution_id:
            text = text.replace("exe_…", self.execution_id)
        if text.startswith(("export ", "alias ")):
            self.prelude.append(text)  # kept for every later command, as a shell session keeps it
            return ""
        script = "\n".join(["set -e", "shopt -s expand_aliases", *self.prelude, text])
        done = subprocess.run(
            ["bash", "-c", script], cwd=self.workdir, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{text!r} exited {done.returncode}: {done.stderr[-500:]}"
        self._remember(done.stdout)
        self._check(text, command.shown, done.stdout)
        return done.stdout

    def python(self, block: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", self.localize(block)],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def _remember(self, output: str) -> None:
        if not self.session_id and (made := re.search(r'"session_id":\s*"(ses_\w+)"', output)):
            self.session_id = made.group(1)
        if made := re.search(r'"execution_id":\s*"(exe_\w+)"', output):
            self.execution_id = made.group(1)

    def _check(self, text: str, shown: list[str], output: str) -> None:
        shown = [self.localize(line) for line in shown]
        if shown[:1] == ["{}"]:
            assert output.strip() == "{}", f"{text!r} answered {output[:300]!r}, the tour shows {{}}"
        if shown and (status := re.match(r"HTTP/1\.1 (\d{3})", shown[0])):
            assert output.startswith(f"HTTP/1.1 {status.group(1)}"), f"{text!r} answered {output[:100]!r}"
        missing = [t for t in shown_tokens(shown) if f'"{t}"' not in output and t not in output]
        assert not missing, f"{text!r}: the tour shows {missing}, the answer was {output[:600]!r}"
