"""The documentation site: the CLI page covers the parser; the built site renders in Chromium."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latkv.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome",
                                   "google-chrome-stable", "headless_shell")
                 if (path := shutil.which(name))), None)


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """``(command name, its parser)`` for every leaf subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, f"{prefix} {name}".strip())
            return
    yield prefix, parser


def test_cli_page_documents_every_command_and_option():
    page = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## `latkv ([a-z ]+)`\n(.*?)(?=^## |\Z)", page, re.M | re.S))
    for name, parser in _commands(build_parser()):
        assert name in sections, f"docs/cli.md has no section for latkv {name}"
        # the usage line is generated from the parser at build time (scripts/mkdocs_cli_usage)
        assert f"<!-- latkv-usage: {name} -->" in sections[name]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = action.option_strings or [action.dest.upper(), action.dest]
            assert any(word in sections[name] for word in words), (
                f"docs/cli.md's latkv {name} section does not mention {words[0]}")


def _chromium(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", *arguments],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary on PATH (headless)")
def test_built_site_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("mkdocs")
    image = pytest.importorskip("matplotlib.image")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                    "--site-dir", str(site)], cwd=ROOT, check=True, timeout=600)
    pages = {"home": site / "index.html", "method": site / "methods" / "turbo" / "index.html",
             "plot": site / "methods" / "e8-rate-distortion.png"}
    for label, page in pages.items():
        assert page.exists(), f"{label}: {page} was not built"
        shot = tmp_path / f"{label}.png"
        result = _chromium("--window-size=1200,900", f"--screenshot={shot}", page.as_uri())
        console_errors = [line for line in result.stderr.splitlines()
                          if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
        assert not console_errors, f"{label}: {console_errors}"
        pixels = image.imread(shot)
        assert pixels.size and pixels.std() > 0.01, f"{label}: a blank screenshot"
