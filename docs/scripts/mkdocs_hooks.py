"""mkdocs hooks (``hooks:`` in mkdocs.yml): render the docstrings' reST idioms on the Markdown site.

The package's docstrings are Google style, as Lightning's, with Sphinx cross-reference roles
(``:func:`~lightning_msr.functional.mean_shift```) and ``Example::`` blocks that ``pytest --doctest-modules``
runs. mkdocstrings renders those roles literally; this hook turns each into a cross-reference that
mkdocs-autorefs links to the API page of the object when the site documents it (plain code otherwise), and
each ``Example::`` into a heading.
"""

from __future__ import annotations

import html
import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|py:\w+):<code>([^<]*)</code>")
_TITLED = re.compile(r"^(?P<title>.*?)\s*&lt;(?P<target>[\w.]+)&gt;$")


def _cross_reference(match: re.Match) -> str:
    text = match.group(1).strip()
    titled = _TITLED.match(text)
    if titled:
        title, target = titled.group("title"), titled.group("target")
    else:
        target = text.lstrip("~").removesuffix("()")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    # an optional autoref: a link when `target` is documented on the site, plain code when it is not
    return f'<autoref identifier="{html.escape(target)}" optional><code>{title}</code></autoref>'


def on_page_content(html_text: str, **kwargs: Any) -> str:
    html_text = _ROLE.sub(_cross_reference, html_text)
    return html_text.replace("<p>Example::</p>", "<p><strong>Example</strong></p>")
