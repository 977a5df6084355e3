"""The immutable template catalog (CONTRACT §6).

Layout: `<root>/<template_id>/<locale>/subject.txt.j2`, `body.txt.j2` (required) and
`body.html.j2` (optional); shared pieces under `<root>/_partials/`. Everything is parsed once at
startup in sandboxed environments where undefined variables are errors.

Escaping follows what is rendered, not file names: `body.html.j2` and everything it includes,
imports or extends (partials and macros, whatever their names) are compiled in an environment
that autoescapes everything; subjects and text bodies in one that escapes nothing.

Size: a rendered subject longer than MAX_SUBJECT characters, or a body part beyond
MAX_BODY_OCTETS of UTF-8, fails the delivery with `render_failed: too large`; rendering stops as
soon as the output passes the bound, so a runaway template costs at most that much work.
`render_off_loop` runs a render in a worker thread (for large inputs, so that the event loop is
never blocked for long).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jinja2
import trio
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailtrio import bcp47, message

SUBJECT = "subject.txt.j2"
TEXT = "body.txt.j2"
HTML = "body.html.j2"
PARTIALS = "_partials"
_TEMPLATE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Bounds on rendered content (CONTRACT §5 extension): the subject as a header the builder folds
# within 998-octet lines (the same bound intake applies to a rendered-mode subject), and each body
# part, in octets of UTF-8.
MAX_SUBJECT: Final = message.MAX_SUBJECT
MAX_BODY_OCTETS: Final = 1024 * 1024
# Variables whose JSON text is larger than this are rendered off the event loop by callers that
# can (`render_off_loop`); smaller ones render inline in well under a millisecond.
OFF_LOOP_BYTES: Final = 64 * 1024


class CatalogError(Exception):
    """The catalog is not usable; `problems` lists `file:line: message` strings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RenderError(Exception):
    """Rendering one delivery failed (undefined variable, sandbox violation, ...)."""


class TooLarge(RenderError):
    """The rendered subject or a body part is beyond its bound."""


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None
    resolved_locale: str


@dataclass(frozen=True)
class _Entry:
    subject: jinja2.Template
    text: jinja2.Template
    html: jinja2.Template | None


def locale_chain(locale: str, default_locale: str) -> list[str]:
    """`zh-Hant-TW` -> [`zh-Hant-TW`, `zh-Hant`, `zh`, default]."""
    parts = locale.split("-")
    chain = ["-".join(parts[:i]) for i in range(len(parts), 0, -1)]
    if default_locale not in chain:
        chain.append(default_locale)
    return chain


def _environment(root: Path, *, html: bool) -> ImmutableSandboxedEnvironment:
    """The environment of HTML bodies (`html`: everything autoescaped, whatever the file is
    called, so that partials and macros a body pulls in are escaped too) or of subjects and text
    bodies (nothing escaped)."""
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        autoescape=html,
        keep_trailing_newline=False,
        auto_reload=False,
        cache_size=-1,
    )


def _bounded(template: jinja2.Template, ctx: dict[str, Any], limit: int, what: str, *, octets: bool) -> str:
    """Render, stopping with TooLarge as soon as the output passes `limit` (characters, or
    octets of UTF-8 when `octets`)."""
    parts: list[str] = []
    size = 0
    for chunk in template.generate(ctx):
        size += len(chunk.encode("utf-8")) if octets and not chunk.isascii() else len(chunk)
        if size > limit:
            unit = "octets" if octets else "characters"
            raise TooLarge(f"too large: the {what} passes {limit} {unit}")
        parts.append(chunk)
    return "".join(parts)


def _describe(exc: BaseException, root: Path, fallback: str) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        name = exc.filename or (str(root / exc.name) if exc.name else fallback)
        return f"{name}:{exc.lineno}: {exc.message}"
    if isinstance(exc, jinja2.TemplateNotFound):
        return f"{fallback}:1: included template not found: {exc.name}"
    return f"{fallback}:1: {exc}"


def _check_references(env: jinja2.Environment, path: Path, problems: list[str]) -> bool:
    """Load every template that `path` includes, extends or imports by a constant name; a missing
    one is reported at the line that names it. Returns False if a problem was added."""
    ok = True
    tree = env.parse(path.read_text(encoding="utf-8"))
    for node in tree.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
        target = getattr(node, "template", None)
        if not isinstance(target, nodes.Const) or not isinstance(target.value, str):
            continue
        try:
            env.get_template(target.value)
        except jinja2.TemplateNotFound:
            if isinstance(node, nodes.Include) and node.ignore_missing:
                continue
            problems.append(f"{path}:{node.lineno}: included template not found: {target.value}")
            ok = False
    return ok


@dataclass
class Catalog:
    root: Path
    default_locale: str
    _entries: dict[str, dict[str, _Entry]] = field(default_factory=dict)

    @property
    def template_ids(self) -> frozenset[str]:
        return frozenset(self._entries)

    def locales(self, template_id: str) -> frozenset[str]:
        return frozenset(self._entries.get(template_id, {}))

    def has_template(self, template_id: str) -> bool:
        return template_id in self._entries

    @classmethod
    def load(cls, root: Path, default_locale: str) -> Catalog:
        """Parse the whole catalog; raise CatalogError listing every problem with file:line."""
        root = Path(root)
        problems: list[str] = []
        if not root.is_dir():
            raise CatalogError([f"{root}:1: template directory does not exist"])
        env = _environment(root, html=False)
        html_env = _environment(root, html=True)
        catalog = cls(root=root, default_locale=default_locale)
        # Partials are parsed too, so a broken one is reported even if nothing includes it yet.
        partials = root / PARTIALS
        if partials.is_dir():
            for path in sorted(partials.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(root).as_posix()
                    try:
                        env.get_template(rel)
                        _check_references(env, path, problems)
                    except UnicodeDecodeError as exc:
                        problems.append(f"{path}:1: not valid UTF-8 ({exc.reason})")
                    except Exception as exc:
                        problems.append(_describe(exc, root, str(path)))
        for tdir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != PARTIALS):
            if tdir.name.startswith("."):
                continue
            if not _TEMPLATE_ID_RE.match(tdir.name):
                problems.append(f"{tdir}:1: invalid template id {tdir.name!r}")
                continue
            locales: dict[str, _Entry] = {}
            for ldir in sorted(p for p in tdir.iterdir() if p.is_dir()):
                if not bcp47.is_canonical(ldir.name):
                    problems.append(f"{ldir}:1: locale directory {ldir.name!r} is not canonical BCP 47")
                    continue
                entry = catalog._load_locale(env, html_env, root, ldir, problems)
                if entry is not None:
                    locales[ldir.name] = entry
            if default_locale not in locales and not any(
                p.startswith(f"{tdir}/{default_locale}/") for p in problems
            ):
                problems.append(
                    f"{tdir / default_locale}:1: template {tdir.name!r} has no default locale "
                    f"{default_locale!r}"
                )
            catalog._entries[tdir.name] = locales
        if not catalog._entries and not problems:
            problems.append(f"{root}:1: the catalog has no templates")
        if problems:
            raise CatalogError(problems)
        return catalog

    def _load_locale(
        self, env: jinja2.Environment, html_env: jinja2.Environment, root: Path, ldir: Path, problems: list[str]
    ) -> _Entry | None:
        loaded: dict[str, jinja2.Template] = {}
        ok = True
        for name in (SUBJECT, TEXT, HTML):
            path = ldir / name
            if not path.is_file():
                if name != HTML:
                    problems.append(f"{path}:1: required file is missing")
                    ok = False
                continue
            rel = path.relative_to(root).as_posix()
            use = html_env if name == HTML else env
            try:
                template = use.get_template(rel)
                # Jinja keeps a template's globals as a ChainMap over the environment's, and every
                # render copies it into a fresh context; the catalog never changes after loading,
                # so a plain dict snapshot renders the same and costs a third less per render.
                template.globals = dict(template.globals)
                loaded[name] = template
                # Parse everything it includes/extends/imports now, not at first render.
                if not _check_references(use, path, problems):
                    ok = False
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:1: not valid UTF-8 ({exc.reason})")
                ok = False
            except Exception as exc:
                problems.append(_describe(exc, root, str(path)))
                ok = False
        if not ok:
            return None
        return _Entry(loaded[SUBJECT], loaded[TEXT], loaded.get(HTML))

    def resolve_locale(self, template_id: str, locale: str) -> str:
        locales = self._entries[template_id]
        for candidate in locale_chain(locale, self.default_locale):
            if candidate in locales:
                return candidate
        raise KeyError(f"{template_id}/{locale}")

    def render(self, template_id: str, locale: str, variables: Mapping[str, Any]) -> Rendered:
        """Render subject, text and html. Raises RenderError; never returns empty content."""
        if template_id not in self._entries:
            raise RenderError(f"unknown template {template_id!r}")
        resolved = self.resolve_locale(template_id, locale)
        entry = self._entries[template_id][resolved]
        ctx = dict(variables)
        try:
            # the raw subject may hold whitespace that is collapsed: bound it at 4x first
            subject = " ".join(_bounded(entry.subject, ctx, 4 * MAX_SUBJECT, "subject", octets=False).split())
            if len(subject) > MAX_SUBJECT:
                raise TooLarge(f"too large: the subject passes {MAX_SUBJECT} characters")
            text = _bounded(entry.text, ctx, MAX_BODY_OCTETS, "text body", octets=True).strip("\n")
            html = (
                _bounded(entry.html, ctx, MAX_BODY_OCTETS, "html body", octets=True)
                if entry.html is not None else None
            )
        except RenderError:
            raise
        except jinja2.UndefinedError as exc:
            raise RenderError(f"undefined variable: {exc.message}") from exc
        except jinja2.exceptions.SecurityError as exc:
            raise RenderError(f"sandbox violation: {exc}") from exc
        except Exception as exc:
            raise RenderError(f"{type(exc).__name__}: {exc}") from exc
        if not subject:
            raise RenderError("empty subject")
        if not text.strip() and not (html and html.strip()):
            raise RenderError("empty body")
        return Rendered(subject=subject, text=text if text.strip() else None, html=html, resolved_locale=resolved)



async def render_off_loop(catalog: Catalog, template_id: str, locale: str, variables: Mapping[str, Any]) -> Rendered:
    """`catalog.render` in a worker thread (the catalog is immutable once loaded, and Jinja
    templates render safely from several threads): for large inputs, which would block the event
    loop for too long. Cancellation waits for the render, which is bounded (see MAX_BODY_OCTETS)."""
    return await trio.to_thread.run_sync(catalog.render, template_id, locale, variables)
