"""mkdocs hook: links from the docs to repository files outside docs/ (``../benchmarks/speed.py``) become
code spans naming the file, so ``mkdocs build --strict`` checks every link that stays inside the site."""

import re

_OUTSIDE = re.compile(r"\[([^\]]+)\]\(\.\./(?!\.\.)([^)#\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    if depth:  # pages in sub-folders (guides/) link to docs/ pages with ../ legitimately
        return markdown
    return _OUTSIDE.sub(lambda m: f"{m.group(1)} (`{m.group(2)}` in the repository)", markdown)
