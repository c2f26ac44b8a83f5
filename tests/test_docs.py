"""README.md and docs/ stay true to the code: every config field listed with its default, every link and image
resolving, every page in the site's nav, the README short and without dates, the site building (mkdocs, strict).
No model loads, no compiles."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from distprompt_jax import BoundConfig, HardPromptConfig, PrefixPromptConfig, SoftPromptConfig, experiment

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
EXPERIMENTS = DOCS / "experiments.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# Docs pages link to files outside docs/ (BENCHMARKS.md, BUILD.md) by their GitHub address, since the site
# (mkdocs) only holds docs/: such links are checked against this working tree instead.
REPO_FILE_URLS = ("https://github.com/distprompt/distprompt_jax/blob/main/",
                  "https://github.com/distprompt/distprompt_jax/tree/main/")
README_MAX_LINES = 150
DATE = re.compile(r"20\d\d-\d\d-\d\d")
# The sections of docs/experiments.md's field tables: heading text that marks each, and where its fields come from.
DATACLASS_SECTIONS = {
    "`config.soft`": SoftPromptConfig, "`config.prefix`": PrefixPromptConfig, "`config.hard`": HardPromptConfig,
    "`config.bound`": BoundConfig,
}
TOP_LEVEL, RECIPES, FINAL_NORM = "Top level", "Target recipes", "`config.final_norm`"


def prose(text: str) -> str:
    """`text` without fenced code blocks: a `# comment` or `[i](x)` inside code is neither heading nor link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def without_code_spans(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", text)


def headings(path: Path) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", prose(path.read_text()), flags=re.M)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor the site gives it (Python-Markdown's toc slugify): runs of spaces and hyphens become one hyphen."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def sections(path: Path, level: int = 3) -> dict[str, list[str]]:
    """Each heading of `level` on a page and the lines under it, up to the next heading of any level."""
    found: dict[str, list[str]] = {}
    current = None
    for line in prose(path.read_text()).splitlines():
        heading = re.match(r"^(#{1,6})\s+(.+)$", line)
        if heading:
            current = heading.group(2).strip() if len(heading.group(1)) == level else None
            if current is not None:
                found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of the first Markdown table's body rows (the header and the |---| line skipped)."""
    rows, started = [], False
    for line in lines:
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    assert len(rows) >= 2 and set(rows[1][0]) <= set("-:"), f"no table under the heading: {lines[:3]}"
    return rows[2:]


def section_table(heading_part: str) -> tuple[list[list[str]], str]:
    matches = {h: lines for h, lines in sections(EXPERIMENTS).items() if heading_part in h}
    assert len(matches) == 1, f"docs/experiments.md: want one ### heading with {heading_part!r}, got {list(matches)}"
    (lines,) = matches.values()
    return table_rows(lines), "\n".join(lines)


def documented(rows: list[list[str]]) -> dict[str, str]:
    """{field name: its default cell}; a first cell may list several fields (`a`, `b`)."""
    fields = {}
    for row in rows:
        names = re.findall(r"`([A-Za-z_]\w*)`", row[0])
        assert names, f"a table row names no field: {row}"
        for name in names:
            assert name not in fields, f"{name} is listed twice"
            fields[name] = row[1]
    return fields


def default_in_cell(cell: str):
    """The Python literal a default cell opens with (`0.001`, `"cosine"`, `None`, `("bound", "soft")`)."""
    match = re.match(r"`([^`]*)`", cell)
    assert match, f"the default {cell!r} does not open with a `literal`"
    return ast.literal_eval(match.group(1))


def assert_fields_match(section: str, expected: dict, rows: list[list[str]]) -> None:
    """The table lists exactly `expected`'s fields; where a default is a plain literal, the table's equals it."""
    table = documented(rows)
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    assert not missing and not extra, (f"docs/experiments.md, {section}: fields missing from the table {missing}, "
                                       f"listed but not in the code {extra}")
    for name, default in expected.items():
        if isinstance(default, (bool, int, float, str, tuple, type(None))):
            assert default_in_cell(table[name]) == default, (
                f"docs/experiments.md, {section}.{name}: the table says {table[name]!r}, the code {default!r}")


@pytest.mark.parametrize("heading, config_class", DATACLASS_SECTIONS.items())
def test_every_field_of_a_config_dataclass_is_in_its_table(heading, config_class):
    rows, _ = section_table(heading)
    expected = {f.name: f.default for f in dataclasses.fields(config_class) if f.init}
    assert_fields_match(heading, expected, rows)


def test_the_top_level_table_lists_every_top_level_field():
    rows, _ = section_table(TOP_LEVEL)
    base = experiment.base_config()
    # Sections and targets are ConfigDicts (documented in their own tables); prompt_lengths has no default.
    expected = {name: base[name] if name in base else ConfigDict() for name in experiment.TOP_LEVEL_FIELDS}
    assert_fields_match("top level", expected, rows)


def test_the_final_norm_table_lists_what_differs_from_soft_and_the_text_names_the_fixed_fields():
    rows, text = section_table(FINAL_NORM)
    rung, soft = experiment.final_norm_defaults(), experiment.soft_defaults()
    expected = {name: rung[name] for name in rung.keys() if rung[name] != soft[name]}
    assert_fields_match("final_norm", expected, rows)
    unnamed = [name for name in experiment.FINAL_NORM_FIXED if f"`{name}`" not in text]
    assert not unnamed, f"docs/experiments.md, final_norm: the fields the rung fixes are not all named: {unnamed}"


def test_the_recipe_table_lists_every_recipe_field_with_the_kinds_that_take_it():
    rows, _ = section_table(RECIPES)
    table = {re.findall(r"`(\w+)`", row[0])[0]: row for row in rows}
    kinds_of = {"kind": set(experiment.TARGET_KINDS)}
    for kind, fields in experiment.RECIPE_FIELDS.items():
        for field in fields:
            kinds_of.setdefault(field, set()).add(kind)
    missing, extra = sorted(set(kinds_of) - set(table)), sorted(set(table) - set(kinds_of))
    assert not missing and not extra, f"docs/experiments.md, target recipes: missing {missing}, not in the code {extra}"
    for field, row in table.items():
        listed = set(experiment.TARGET_KINDS) if row[1] == "all" else set(re.split(r",\s*", row[1]))
        assert listed == kinds_of[field], (
            f"target recipes, {field}: the table says kinds {row[1]!r}, the code {sorted(kinds_of[field])}")


def test_every_config_file_is_in_the_configs_table_and_every_named_one_exists():
    rows = table_rows(sections(EXPERIMENTS, level=2)["The configs"])
    listed = {re.findall(r"`(configs/\w+\.py)`", row[0])[0] for row in rows}
    present = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert listed == present, f"the configs table: missing {present - listed}, gone {listed - present}"
    for page in PAGES:
        for name in re.findall(r"configs/\w+\.py", page.read_text()):
            assert (ROOT / name).is_file(), f"{page.name} names {name}, which does not exist"


def links(path: Path) -> list[str]:
    """Targets of the page's links and images, outside code."""
    text = without_code_spans(prose(path.read_text()))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        if target.startswith(REPO_FILE_URLS):
            path_part, _, anchor = target.split("/main/", 1)[1].partition("#")
            file = ROOT / path_part
        elif re.match(r"^[a-z]+:", target):
            continue  # another site: not checked offline
        else:
            path_part, _, anchor = target.partition("#")
            file = (page.parent / path_part).resolve() if path_part else page
            if page.parent == DOCS and path_part and DOCS.resolve() not in file.parents:
                broken.append(f"{target} (outside docs/, which the site does not hold: link its GitHub address)")
                continue
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor:
            slugs = {github_slug(h) for h in headings(file)} & {mkdocs_slug(h) for h in headings(file)}
            if anchor not in slugs:
                broken.append(f"{target} (no heading with that anchor on GitHub and on the site)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_is_short_and_undated_and_no_page_is_dated():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, more than {README_MAX_LINES}"
    dated = [f"{page.name}: {m.group(0)}" for page in PAGES for m in DATE.finditer(page.read_text())]
    assert not dated, f"dates in user docs (dated runs belong in BENCHMARKS.md): {dated}"


def test_readme_links_every_docs_page_and_the_site_lists_them_all():
    pages = {p.name for p in DOCS.glob("*.md")}
    linked = {Path(t.partition("#")[0]).name for t in links(README) if t.startswith("docs/")}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    assert nav == pages, f"mkdocs.yml's nav: missing {sorted(pages - nav)}, not in docs/ {sorted(nav - pages)}"


def test_readme_shows_the_test_command_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line
          and not line.lstrip().startswith("#")]
    assert len(ci) == 1, f".ci/run: expected one line running pytest, got {ci}"
    assert ci[0] in README.read_text().splitlines(), f"README.md does not show CI's test command:\n{ci[0]}"


def test_the_site_builds_without_a_warning(tmp_path):
    # mkdocs.yml is strict: a broken link or anchor between pages, or a page left out of the nav, fails the build.
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
