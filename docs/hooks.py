"""MkDocs hook: the pages that must not drift from the code are rendered from it when the site is built.

A page holds a marker (`<!-- stexport:NAME -->`) that `on_page_markdown` replaces with:
- `cli-reference`: every command's `--help`, through typer's own Markdown generator (`typer ... utils docs`);
- `manifest-schema`, `taskpack-schema`: pydantic's JSON Schema of `Manifest` and `TaskPackRecord`;
- `moved-modules`: the old → new module paths of `stexport/_moved.py`;
- `legacy-flags`: the CLI's old flag spellings (`LEGACY_FLAGS` in `cli/common.py`).
A marker left in a page after rendering is a build error, so a misspelt one fails `mkdocs build --strict`.
"""

from __future__ import annotations

import json
import re

MARKER = re.compile(r"<!-- stexport:([a-z-]+) -->")


def cli_reference() -> str:
    import typer
    import typer.cli
    from stexport.cli.app import app

    command = typer.main.get_command(app)
    try:
        import click
    except ImportError:  # typer 0.2x vendors click
        from typer import _click as click
    text = typer.cli.get_docs_for_click(obj=command, ctx=click.Context(command), name="stexport")
    text = text.split("\n", 1)[1]  # the page has its own title
    # each command's epilog holds its examples as lines indented by two spaces: show them as code
    text = re.sub(r"(?m)^  (stexport .*)$", r"    \1", text)
    return text.strip() + "\n"


def schema(model) -> str:
    return "```json\n" + json.dumps(model.model_json_schema(), indent=2, ensure_ascii=False) + "\n```\n"


def moved_modules() -> str:
    from stexport._moved import MOVED, OLD_MODULE_OF_PACKAGE

    rows = [f"| `{old}` | `{new}` |" for old, new in MOVED.items()]
    rows += [f"| `{old}` (its names) | `{new}` |" for old, new in OLD_MODULE_OF_PACKAGE.items()]
    return "| old path | new path |\n|---|---|\n" + "\n".join(rows) + "\n"


def legacy_flags() -> str:
    from stexport.cli.common import LEGACY_FLAGS

    rows = [f"| `stexport {cmd} {flag}` | `{new}` |" for (cmd, flag), new in LEGACY_FLAGS.items()]
    rows += ["| `stexport verify --json FILE` | `--report FILE` |",
             "| `stexport verify --json -` | `--json` |"]
    return "| old spelling | use |\n|---|---|\n" + "\n".join(rows) + "\n"


def render(name: str) -> str:
    if name == "cli-reference":
        return cli_reference()
    if name == "manifest-schema":
        from stexport.bundle.manifest import Manifest

        return schema(Manifest)
    if name == "taskpack-schema":
        from stexport.bundle.manifest import TaskPackRecord

        return schema(TaskPackRecord)
    if name == "moved-modules":
        return moved_modules()
    if name == "legacy-flags":
        return legacy_flags()
    raise ValueError(f"unknown marker <!-- stexport:{name} -->")


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
