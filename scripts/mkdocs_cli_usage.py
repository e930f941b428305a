"""mkdocs hook: the usage lines of docs/cli.md come from latkv's argument parser.

A line ``<!-- latkv-usage: COMMAND -->`` in a page becomes a ``bash`` block with the usage of
``latkv COMMAND`` as argparse prints it (wrapped at 96 columns), so the synopsis on the site
cannot drift from the code. ``tests/test_docs.py`` checks that the page's option tables cover
every option of the parser.
"""

from __future__ import annotations

import argparse
import os
import re

MARKER = re.compile(r"^<!-- latkv-usage: ([a-z ]+) -->$", re.MULTILINE)


def usage(command: str) -> str:
    """``latkv COMMAND``'s usage line(s) without the leading ``usage: ``."""
    from latkv.cli import build_parser

    parser = build_parser()
    for word in command.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "96"
    try:
        text = parser.format_usage()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return text.removeprefix("usage: ").rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda match: f"```bash\n{usage(match.group(1))}\n```", markdown)
