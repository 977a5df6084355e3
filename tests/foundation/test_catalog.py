"""The template catalog (CONTRACT §6) and `mailtrio templates check`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mailtrio.catalog import Catalog, CatalogError, RenderError, locale_chain
from tests.foundation.conftest import run_cli
from tests.support.serve import TEMPLATES, base_env


def write(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def minimal(root: Path, template_id: str = "welcome", locale: str = "en") -> Path:
    write(root, f"{template_id}/{locale}/subject.txt.j2", "Welcome {{ name }}")
    write(root, f"{template_id}/{locale}/body.txt.j2", "Hello {{ name }}")
    return root


def problems_of(root: Path, default_locale: str = "en") -> list[str]:
    with pytest.raises(CatalogError) as info:
        Catalog.load(root, default_locale)
    return info.value.problems


@pytest.fixture
def sample() -> Catalog:
    return Catalog.load(TEMPLATES, "en")


# -- locale fallback ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "default", "chain"),
    [
        ("zh-Hant-TW", "en", ["zh-Hant-TW", "zh-Hant", "zh", "en"]),
        ("fr-CA", "en", ["fr-CA", "fr", "en"]),
        ("en", "en", ["en"]),
        ("en-GB", "en", ["en-GB", "en"]),
        ("pt-BR", "fr", ["pt-BR", "pt", "fr"]),
    ],
)
def test_locale_chain(locale: str, default: str, chain: list[str]) -> None:
    assert locale_chain(locale, default) == chain


@pytest.mark.parametrize(
    ("template_id", "locale", "resolved"),
    [
        ("login-code", "fr", "fr"),
        ("login-code", "fr-CA", "fr"),
        ("login-code", "pt-BR", "pt-BR"),
        ("login-code", "pt-PT", "en"),
        ("login-code", "de", "en"),
        ("login-code", "zh-Hant-TW", "en"),
        ("newsletter", "pt-BR", "en"),
        ("newsletter", "fr-BE", "fr"),
    ],
)
def test_sample_catalog_falls_back(sample: Catalog, template_id: str, locale: str, resolved: str) -> None:
    assert sample.resolve_locale(template_id, locale) == resolved
    variables = {"code": "123456", "title": "News", "intro": "Hi"}
    assert sample.render(template_id, locale, variables).resolved_locale == resolved


def test_fallback_walks_every_subtag(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    write(root, "welcome/zh-Hant/subject.txt.j2", "歡迎 {{ name }}")
    write(root, "welcome/zh-Hant/body.txt.j2", "你好 {{ name }}")
    write(root, "welcome/zh/subject.txt.j2", "欢迎 {{ name }}")
    write(root, "welcome/zh/body.txt.j2", "你好 {{ name }}")
    catalog = Catalog.load(root, "en")
    assert catalog.render("welcome", "zh-Hant-TW", {"name": "A"}).resolved_locale == "zh-Hant"
    assert catalog.render("welcome", "zh-Hans-CN", {"name": "A"}).resolved_locale == "zh"
    assert catalog.render("welcome", "ja", {"name": "A"}).subject == "Welcome A"


# -- the sample catalog ------------------------------------------------------------------------


def test_sample_catalog_has_the_contract_examples(sample: Catalog) -> None:
    assert {"login-code", "newsletter"} <= sample.template_ids
    assert len(sample.locales("login-code")) >= 2
    login = sample.render("login-code", "fr", {"code": "428193"})
    assert "428193" in login.subject and "428193" in (login.text or "")
    assert login.html is None
    news = sample.render("newsletter", "en", {"title": "Autumn", "intro": "Hello", "items": ["a", "b"]})
    assert news.html is not None and "<li>a</li>" in news.html
    assert news.text and "Autumn" in news.text


def test_html_is_autoescaped_and_text_is_not(sample: Catalog) -> None:
    out = sample.render("newsletter", "en", {"title": "<b>Tom & Jerry</b>", "intro": "<script>x()</script>"})
    assert out.html is not None
    assert "&lt;script&gt;x()&lt;/script&gt;" in out.html and "<script>" not in out.html
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in out.html
    assert out.text is not None and "<b>Tom & Jerry</b>" in out.text
    assert out.subject == "<b>Tom & Jerry</b>"


def test_undefined_variables_are_errors(sample: Catalog) -> None:
    with pytest.raises(RenderError, match="undefined"):
        sample.render("login-code", "en", {})
    with pytest.raises(RenderError, match="undefined"):
        sample.render("newsletter", "en", {"title": "x"})


def test_sandbox_blocks_unsafe_access_and_mutation(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    write(root, "probe/en/subject.txt.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    write(root, "probe/en/body.txt.j2", "body")
    write(root, "mutate/en/subject.txt.j2", "{{ items.append(1) }}{{ items }}")
    write(root, "mutate/en/body.txt.j2", "body")
    catalog = Catalog.load(root, "en")
    with pytest.raises(RenderError):
        catalog.render("probe", "en", {})
    items: list[int] = []
    with pytest.raises(RenderError):
        catalog.render("mutate", "en", {"items": items})
    assert items == []


def test_empty_subject_or_body_is_a_render_error(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    write(root, "blank/en/subject.txt.j2", "{{ subject }}")
    write(root, "blank/en/body.txt.j2", "{{ body }}")
    catalog = Catalog.load(root, "en")
    with pytest.raises(RenderError, match="subject"):
        catalog.render("blank", "en", {"subject": "  ", "body": "x"})
    with pytest.raises(RenderError, match="body"):
        catalog.render("blank", "en", {"subject": "s", "body": "\n \n"})
    with pytest.raises(RenderError, match="unknown template"):
        catalog.render("nope", "en", {})


def test_subject_is_one_line(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    write(root, "multi/en/subject.txt.j2", "Hello\n  {{ name }}\r\n")
    write(root, "multi/en/body.txt.j2", "x")
    assert Catalog.load(root, "en").render("multi", "en", {"name": "A"}).subject == "Hello A"


# -- load-time problems, each naming file and line -------------------------------------------------


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    bad = write(root, "welcome/fr/body.txt.j2", "line one\nline two\n{% if x %}unclosed\n")
    write(root, "welcome/fr/subject.txt.j2", "ok")
    [problem] = problems_of(root)
    assert problem.startswith(f"{bad}:")
    assert "unclosed" in problem or "endif" in problem or "end of template" in problem


def test_syntax_error_line_number_is_exact(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    bad = write(root, "welcome/en/body.txt.j2", "one\ntwo\nthree {{ name }\nfour\n")
    [problem] = problems_of(root)
    assert problem.startswith(f"{bad}:3:"), problem


def test_broken_partial_is_reported_even_if_unused(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    bad = write(root, "_partials/sig.txt.j2", "ok\n{{ broken(\n")
    [problem] = problems_of(root)
    assert problem.startswith(f"{bad}:"), problem


def test_missing_include_names_the_including_file_and_line(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    bad = write(root, "welcome/en/body.txt.j2", "Hello\n\n{% include '_partials/nowhere.txt.j2' %}\n")
    [problem] = problems_of(root)
    assert problem.startswith(f"{bad}:3:"), problem
    assert "_partials/nowhere.txt.j2" in problem


def test_every_template_needs_the_default_locale(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    minimal(root, "goodbye", "fr")
    [problem] = problems_of(root)
    assert str(root / "goodbye" / "en") in problem and "default locale" in problem
    # with French as the default locale, `welcome` is the one missing it
    [problem] = problems_of(root, "fr")
    assert str(root / "welcome" / "fr") in problem


def test_required_files_and_canonical_locales(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    write(root, "welcome/de/subject.txt.j2", "Hallo")
    write(root, "welcome/en_US/subject.txt.j2", "Hi")
    write(root, "welcome/en_US/body.txt.j2", "Hi")
    write(root, "welcome/es/body.txt.j2", "Hola")
    write(root, "welcome/it/subject.txt.j2", b"\xff\xfe bad")
    write(root, "welcome/it/body.txt.j2", "Ciao")
    problems = problems_of(root)
    joined = "\n".join(problems)
    assert f"{root / 'welcome' / 'de' / 'body.txt.j2'}:1:" in joined
    assert f"{root / 'welcome' / 'es' / 'subject.txt.j2'}:1:" in joined
    assert f"{root / 'welcome' / 'en_US'}:1:" in joined
    assert f"{root / 'welcome' / 'it' / 'subject.txt.j2'}:1:" in joined
    assert len(problems) == 4, problems


def test_all_problems_are_reported_at_once(broken_catalog: tuple[Path, str], tmp_path: Path) -> None:
    root, bad_file = broken_catalog
    second = write(root, "login-code/fr/subject.txt.j2", "{{ code ")
    problems = problems_of(root)
    assert len(problems) == 2
    assert any(p.startswith(f"{bad_file}:3:") for p in problems)
    assert any(p.startswith(f"{second}:1:") for p in problems)


def test_empty_or_missing_catalog(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [f"{tmp_path}:1: the catalog has no templates"]
    assert problems_of(tmp_path / "missing")[0].startswith(f"{tmp_path / 'missing'}:1:")


# -- `mailtrio templates check` ----------------------------------------------------------------


def test_templates_check_accepts_the_sample_catalog() -> None:
    done = run_cli(["templates", "check", str(TEMPLATES)], base_env())
    assert done.code == 0, done
    assert "ok login-code: en, fr, pt-BR" in done.stdout
    assert "ok newsletter: en, fr" in done.stdout


def test_templates_check_reads_the_environment(tmp_path: Path) -> None:
    done = run_cli(["templates", "check"], base_env(MAIL_TEMPLATE_DIR=str(TEMPLATES)), cwd=tmp_path)
    assert done.code == 0, done
    missing = run_cli(["templates", "check"], base_env())
    assert missing.code == 2 and "MAIL_TEMPLATE_DIR" in missing.stderr


def test_templates_check_reports_file_and_line(broken_catalog: tuple[Path, str]) -> None:
    root, bad_file = broken_catalog
    done = run_cli(["templates", "check", str(root)], base_env())
    assert done.code == 1, done
    assert done.stdout.splitlines()[0].startswith(f"{bad_file}:3:")
    assert "1 problem(s)" in done.stderr


def test_templates_check_applies_the_default_locale(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    shutil.copytree(TEMPLATES, root)
    ok = run_cli(["templates", "check", str(root)], base_env(MAIL_DEFAULT_LOCALE="fr"))
    assert ok.code == 0, ok
    done = run_cli(["templates", "check", str(root)], base_env(MAIL_DEFAULT_LOCALE="pt-BR"))
    assert done.code == 1, done
    assert str(root / "newsletter" / "pt-BR") in done.stdout


def test_a_partial_including_a_missing_partial(tmp_path: Path) -> None:
    root = minimal(tmp_path)
    bad = write(root, "_partials/footer.txt.j2", "--\n{% include '_partials/gone.txt.j2' %}\n")
    [problem] = problems_of(root)
    assert problem.startswith(f"{bad}:2: included template not found"), problem


# -- escaping follows what is rendered; size bounds (#13.5, #13.6) ---------------------------------


def test_everything_an_html_body_pulls_in_is_autoescaped_whatever_its_name(tmp_path: Path) -> None:
    minimal(tmp_path)
    write(tmp_path, "_partials/footer.txt.j2", "<p>{{ name }}</p>")
    write(tmp_path, "_partials/macros.j2", "{% macro hello(n) %}<b>{{ n }}</b>{% endmacro %}")
    write(tmp_path, "_partials/plain", "[{{ name }}]")
    write(tmp_path, "welcome/en/body.html.j2",
          '{% from "_partials/macros.j2" import hello %}{{ hello(name) }}'
          '{% include "_partials/footer.txt.j2" %}{% include "_partials/plain" %}{{ name }}')
    write(tmp_path, "welcome/en/body.txt.j2", '{% include "_partials/footer.txt.j2" %} {{ name }}')
    catalog = Catalog.load(tmp_path, "en")
    out = catalog.render("welcome", "en", {"name": "<script>&"})
    assert out.html is not None and "<script>" not in out.html
    assert out.html.count("&lt;script&gt;&amp;") == 4
    assert "<b>" in out.html and "<p>" in out.html  # the template's own markup is kept
    # text and subject are never escaped, even with the same partial
    assert out.text == "<p><script>&</p> <script>&"
    assert out.subject == "Welcome <script>&"


def test_a_subject_or_body_beyond_its_bound_fails_as_too_large(tmp_path: Path) -> None:
    from mailtrio.catalog import MAX_BODY_OCTETS, MAX_SUBJECT, TooLarge

    minimal(tmp_path)
    write(tmp_path, "big/en/subject.txt.j2", "{{ s }}")
    write(tmp_path, "big/en/body.txt.j2", "{% for i in range(n) %}{{ chunk }}{% endfor %}")
    catalog = Catalog.load(tmp_path, "en")
    ok = catalog.render("big", "en", {"s": "s" * MAX_SUBJECT, "n": 1, "chunk": "x" * MAX_BODY_OCTETS})
    assert len(ok.subject) == MAX_SUBJECT
    with pytest.raises(TooLarge, match=r"^too large: the subject"):
        catalog.render("big", "en", {"s": "s" * (MAX_SUBJECT + 1), "n": 1, "chunk": "x"})
    with pytest.raises(TooLarge, match=r"^too large: the text body"):
        catalog.render("big", "en", {"s": "s", "n": 1, "chunk": "é" * (MAX_BODY_OCTETS // 2 + 1)})
    # a runaway loop stops at the bound (the sandbox caps range() at 100,000 items)
    with pytest.raises(TooLarge):
        catalog.render("big", "en", {"s": "s", "n": 100_000, "chunk": "y" * 1000})
    assert issubclass(TooLarge, RenderError)


async def test_render_off_loop_renders_in_a_thread(sample: Catalog) -> None:
    from mailtrio.catalog import render_off_loop

    out = await render_off_loop(sample, "newsletter", "en", {"title": "T", "intro": "x" * 200_000})
    assert out == sample.render("newsletter", "en", {"title": "T", "intro": "x" * 200_000})
