"""mkdocs hook: links from the docs to repository files outside docs/ (``../benchmarks/speed.py``) become
code spans naming the file, so ``mkdocs build --strict`` checks every link that stays inside the site."""

import re

_OUTSIDE = re.compile(r"\[([^\]]+)\]\(\.\./(?!\.\.)([^)#\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    if depth:  # pages in sub-folders (guides/) link to docs/ pages with ../ legitimately
        return markdown
    return _OUTSIDE.sub(lambda m: f"{m.group(1)} (`{m.group(2)}` in the repository)", markdown)


# Sphinx roles in docstrings (":class:`Teacher`", ":func:`~ki_trainer.data.load_debian_sections`") reach the page as
# ":class:<code>Teacher</code>": keep the code span, drop the role, a leading "~" and the module path.
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj|const):(<code>)~?(?:[\w.]+\.)?([^<]*</code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1\2", html)
