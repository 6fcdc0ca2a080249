"""The documentation agrees with the code. Over README.md and every docs/*.md page:

1. every config file it names (`configs/NAME.py`, `configs/NAME.py:PRESET`, `NAME.py:PRESET`,
   `NAME:PRESET` for a file in configs/) loads with that preset, and the `@KEY=VALUE` overrides
   of a `memtx.compare` config spec apply to it;
2. every `--config.KEY=VALUE` (and, in code blocks, `--config.KEY VALUE`) override and every
   config key in an inline code span (`model.knn.size`, `data.loss_mask=kv_recall_answers`) names
   a key of `memtx.config.Config`, and its value parses with `apply_override` (which checks the
   key and the value's type, not how it combines with other keys, so a default Config serves for
   every preset);
3. every relative link and image resolves to a file, and every `#anchor` (on the page itself or
   on `page.md#anchor`) is a heading of that page, by GitHub's rule;
4. every repository path it names (scripts/, benchmarks/, memtx/, tests/, launch/, configs/,
   docs/), every `python -m memtx.X` module, every dotted `memtx.X.name` and every `memtx-*`
   command exists; and docs/layout.md names every module of memtx/ and memtx/memory/.

Placeholders are skipped by one rule (see `is_placeholder`): a value or path with `$`, `<`, `>`,
`...` or `…`, or with a word in capitals (N, DIR, RUN, KEY, VALUE, NAME, gs://BUCKET/...; README
excepted). A placeholder value still has its key checked. Nothing is trained or compiled: the
file takes a few seconds, most of it importing memtx.config.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import re
import tomllib
from pathlib import Path

import pytest

from memtx import config as memtx_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))
SECTIONS = tuple(f.name for f in dataclasses.fields(memtx_config.Config)
                 if dataclasses.is_dataclass(getattr(memtx_config.Config(), f.name)))
# Inline code that looks like a config key but is not one.
NOT_CONFIG_KEYS = {"model.apply"}  # Flax's Module.apply (docs/generation.md)
PATH_DIRS = ("scripts", "benchmarks", "memtx", "tests", "launch", "configs", "docs")


# ---------------------------------------------------------------------------------------------
# Text helpers


def page_name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def code_block_mask(text: str) -> list[bool]:
    """Per line (0-based): inside a fenced code block (the fences included)."""
    mask, inside = [], False
    for line in text.split("\n"):
        fence = line.lstrip().startswith("```")
        mask.append(inside or fence)
        if fence:
            inside = not inside
    return mask


def prose(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked (same length, same lines),
    so that links and headings are read from the prose only."""
    mask = code_block_mask(text)
    lines = [" " * len(line) if m else line for line, m in zip(text.split("\n"), mask)]
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(lines))


PLACEHOLDER_WORD = re.compile(r"(?<![A-Za-z])[A-Z][A-Z0-9_]*(?![a-z])")


def is_placeholder(text: str) -> bool:
    """A shell-style placeholder rather than a value: $VAR, <x>, ..., …, or a word in capitals
    (N, S, DIR, RUN, KEY, VALUE, NAME, L1, gs://BUCKET/x); README (a file name) is not one."""
    if any(mark in text for mark in ("$", "<", ">", "...", "…")):
        return True
    return any(word not in ("README",) for word in PLACEHOLDER_WORD.findall(text))


def expand_braces(text: str) -> list[str]:
    """`a.{b,c}` -> [`a.b`, `a.c`] (one level, as the docs write it)."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [out for part in m.group(1).split(",")
            for out in expand_braces(text[:m.start()] + part.strip() + text[m.end():])]


# ---------------------------------------------------------------------------------------------
# 1. Config files and presets


CONFIG_REF = re.compile(r"(?<![\w./-])(configs/)?(" + "|".join(map(re.escape, CONFIG_NAMES))
                        + r")(\.py)?(?::([A-Za-z_]\w*))?(?![\w/])")
AT_OVERRIDE = re.compile(r"@([A-Za-z_][\w.]*)=([^\s@`\]\[]+)")
# Presets listed after a file: `configs/txl.py:cpu` (`wt103`, `enwik8`, ...) or `configs/knn.py`: `cpu`, `cpu_8192`
_PRESET_LIST = r"`[A-Za-z_]\w*`(?:(?:,\s*|/|,?\s+and\s+)`[A-Za-z_]\w*`)*"
PRESETS_IN_PARENS = re.compile(r"`?\s*\((" + _PRESET_LIST + r")(?:,\s*(?:\.\.\.|…))?\)")
PRESETS_AFTER_COLON = re.compile(r"`?:\s*(" + _PRESET_LIST + r")")


@functools.lru_cache(maxsize=None)
def load_config(name: str, preset: str):
    spec = str(ROOT / "configs" / f"{name}.py") + (f":{preset}" if preset else "")
    return memtx_config.load_config_file(spec)


def config_problems(page: str, text: str) -> tuple[list[str], int]:
    """Every config file reference loads; a `memtx.compare` spec's @KEY=VALUE applies to it."""
    problems, count = [], 0
    for m in CONFIG_REF.finditer(text):
        prefix, name, py, preset = m.groups()
        if not (prefix or py or preset):  # a bare word such as `knn` is a label, not a file
            continue
        if preset and is_placeholder(preset):
            continue
        count += 1
        where = f"{page}:{line_of(text, m.start())}: `{m.group(0)}`"
        try:
            cfg = load_config(name, preset or "")
        except memtx_config.ConfigError as e:
            problems.append(f"{where}: {e}")
            continue
        pos = m.end()
        while (at := AT_OVERRIDE.match(text, pos)) is not None:  # FILE.py:PRESET@KEY=VALUE@...
            key, value = at.groups()
            pos = at.end()
            if is_placeholder(key) or is_placeholder(value):
                continue
            try:
                memtx_config.apply_override(copy.deepcopy(cfg), key, value)
            except memtx_config.ConfigError as e:
                problems.append(f"{where}@{key}={value}: {e}")
        listed = PRESETS_IN_PARENS.match(text, m.end()) or (None if preset else PRESETS_AFTER_COLON.match(text, m.end()))
        for other in re.findall(r"`(\w+)`", listed.group(1)) if listed else []:
            count += 1
            try:
                load_config(name, other)
            except memtx_config.ConfigError as e:
                problems.append(f"{where} ... `{other}`: {e}")
    return problems, count


# ---------------------------------------------------------------------------------------------
# 2. Config keys and --config. overrides


OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)(=[^\s`\]\"]*)?")
INLINE_KEY = re.compile(r"`(" + "|".join(SECTIONS) + r")\.([a-z_][\w.]*)(=[^`]*)?`")


def key_problem(key: str) -> str | None:
    """None if `key` names a settable field of Config (the walk `apply_override` does)."""
    node = memtx_config.Config()
    for depth, part in enumerate(key.split(".")):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            return f"unknown config key '{key}'"
        node = getattr(node, part)
        last = depth == len(key.split(".")) - 1
        if last and dataclasses.is_dataclass(node):
            return f"config key '{key}' is a section"
        if not last and not dataclasses.is_dataclass(node):
            return f"unknown config key '{key}' ('{part}' is not a section)"
    return None


def override_problem(key: str, value: str | None) -> str | None:
    if value is None or is_placeholder(value):
        return key_problem(key)
    value = value.strip("'\"")
    if value.count(")") > value.count("("):  # `(--config.x=1)` in prose
        value = value.rstrip(")")
    try:
        memtx_config.apply_override(memtx_config.Config(), key, value)
    except memtx_config.ConfigError as e:
        return str(e)
    return None


def override_problems(page: str, text: str) -> tuple[list[str], int]:
    problems, count = [], 0
    code = code_block_mask(text)
    for m in OVERRIDE.finditer(text):
        key, value = m.group(1).rstrip("."), m.group(2)
        if is_placeholder(key):  # --config.SECTION.FIELD=VALUE, --config.KEY=VALUE
            continue
        value = value[1:] if value is not None else None
        if value is None and code[line_of(text, m.start()) - 1]:  # `--config.KEY VALUE` in a command
            spaced = re.match(r"[ \t]+([^\s\\#-][^\s]*)", text[m.end():])
            value = spaced.group(1) if spaced else None
        count += 1
        problem = override_problem(key, value)
        if problem:
            problems.append(f"{page}:{line_of(text, m.start())}: `{m.group(0)}`: {problem}")
    for m in INLINE_KEY.finditer(text):
        key = f"{m.group(1)}.{m.group(2)}"
        if key in NOT_CONFIG_KEYS:
            continue
        count += 1
        value = m.group(3)[1:] if m.group(3) is not None else None
        problem = override_problem(key, value)
        if problem:
            problems.append(f"{page}:{line_of(text, m.start())}: `{m.group(0).strip('`')}`: {problem}")
    return problems, count


# ---------------------------------------------------------------------------------------------
# 3. Links and anchors


LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)


def github_anchor(heading: str) -> str:
    """GitHub's heading id: the text (markup dropped) in lower case, every character but letters,
    digits, underscores, hyphens and spaces removed, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line, in_code in zip(text.split("\n"), code_block_mask(text)):
        m = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m and not in_code:
            slug = github_anchor(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def link_problems(page_path: Path, text: str) -> tuple[list[str], int]:
    problems, count = [], 0
    page = page_name(page_path)
    visible = prose(text)
    targets = [(m.start(), m.group(1)) for m in LINK.finditer(visible)]
    targets += [(m.start(), m.group(1)) for m in HTML_SRC.finditer(visible)]
    for pos, target in sorted(targets):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        count += 1
        where = f"{page}:{line_of(text, pos)}: link `{target}`"
        path_part, _, anchor = target.partition("#")
        dest = (page_path.parent / path_part).resolve() if path_part else page_path
        if not dest.exists():
            problems.append(f"{where}: {page_name(dest)} does not exist")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors_of(dest.read_text()):
                known = ", ".join(sorted(anchors_of(dest.read_text())))
                problems.append(f"{where}: no heading '#{anchor}' in {page_name(dest)} (headings: {known})")
    return problems, count


# ---------------------------------------------------------------------------------------------
# 4. Paths, modules and commands


REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(PATH_DIRS) + r")/[\w./*{},-]*)")
MODULE_RUN = re.compile(r"-m\s+(memtx(?:\.[\w{},]+)*)(\.…|\.\.\.)?")
DOTTED = re.compile(r"(?<![\w./-])(memtx(?:\.[A-Za-z_{}][\w{},]*)+)")
COMMAND = re.compile(r"(?<![\w/-])(memtx-[a-z][a-z0-9-]*)")


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@functools.lru_cache(maxsize=None)
def top_level_names(path: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def dotted_problem(name: str, runnable: bool) -> str | None:
    """None if `name` is a module of memtx (runnable: with `python -m`), or a module and a name
    defined at its top level (`memtx.layers.stack_params`)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(parts[:cut])
        if path is None:
            continue
        rest = parts[cut:]
        if runnable:
            if rest:
                return f"no module {name}"
            if path.name == "__init__.py" and not (path.parent / "__main__.py").is_file():
                return f"{name} is a package without __main__"
            return None
        if rest and rest[0] not in top_level_names(path):
            return f"{'.'.join(parts[:cut])} ({page_name(path)}) defines no '{rest[0]}'"
        return None
    return f"no module {name}"


@functools.lru_cache(maxsize=None)
def console_scripts() -> frozenset[str]:
    return frozenset(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def path_problems(page: str, text: str) -> tuple[list[str], dict[str, int]]:
    problems, counts = [], {"paths": 0, "modules run": 0, "dotted names": 0, "commands": 0}
    for m in REPO_PATH.finditer(text):
        raw = m.group(1).rstrip(".,;:")
        for path in expand_braces(raw):
            if is_placeholder(path):  # memtx/memory/NAME.py
                continue
            counts["paths"] += 1
            if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                problems.append(f"{page}:{line_of(text, m.start())}: path `{path}` does not exist")
    for m in MODULE_RUN.finditer(text):
        if m.group(2):  # `python -m memtx.…`: any of them
            continue
        for name in expand_braces(m.group(1)):
            counts["modules run"] += 1
            if problem := dotted_problem(name, runnable=True):
                problems.append(f"{page}:{line_of(text, m.start())}: `python -m {name}`: {problem}")
    for m in DOTTED.finditer(text):
        for name in expand_braces(m.group(1)):
            counts["dotted names"] += 1
            if problem := dotted_problem(name, runnable=False):
                problems.append(f"{page}:{line_of(text, m.start())}: `{name}`: {problem}")
    for m in COMMAND.finditer(text):
        counts["commands"] += 1
        if m.group(1) not in console_scripts():
            problems.append(f"{page}:{line_of(text, m.start())}: command `{m.group(1)}` is not in "
                            f"pyproject.toml's [project.scripts] ({', '.join(sorted(console_scripts()))})")
    return problems, counts


# ---------------------------------------------------------------------------------------------
# The tests


def pages():
    return [(page_name(p), p, p.read_text()) for p in PAGES]


def report(problems: list[str]) -> str:
    return f"{len(problems)} stale reference(s) in the docs:\n  " + "\n  ".join(problems)


def test_the_docs_pages_are_there_and_the_readme_is_short():
    names = {page_name(p) for p in PAGES}
    assert {"README.md", "docs/training.md", "docs/results.md", "docs/layout.md"} <= names, names
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the details belong in docs/ (at most 250)"


def collect(check, by_path: bool = False):
    """`check`'s problems over every page, and its reference counts added (a number, or a dict of them)."""
    problems, counts = [], None
    for page, path, text in pages():
        p, n = check(path if by_path else page, text)
        problems += p
        counts = n if counts is None else ({k: counts.get(k, 0) + v for k, v in n.items()} if isinstance(n, dict)
                                           else counts + n)
    return problems, counts


def test_every_config_file_and_preset_named_loads():
    problems, count = collect(config_problems)
    assert not problems, report(problems)
    assert count > 0, "no config file reference found: the pattern no longer matches the docs"


def test_every_config_override_and_key_named_resolves_and_parses():
    problems, count = collect(override_problems)
    assert not problems, report(problems)
    assert count > 0, "no --config. override found: the pattern no longer matches the docs"


def test_every_link_image_and_anchor_resolves():
    problems, count = collect(link_problems, by_path=True)
    assert not problems, report(problems)
    assert count > 0


def test_every_path_module_and_command_named_exists():
    problems, counts = collect(path_problems)
    assert not problems, report(problems)
    assert all(counts.values()), counts


def test_the_layout_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = [p for d in ("memtx", "memtx/memory") for p in sorted((ROOT / d).glob("*.py"))
               if p.name != "__init__.py"]
    modules += [p for d in ("memtx", "memtx/memory") for p in sorted((ROOT / d).iterdir())
                if p.is_dir() and (p / "__init__.py").is_file()]
    missing = [page_name(p) + ("/" if p.is_dir() else "") for p in modules
               if page_name(p) + ("/" if p.is_dir() else "") not in layout]
    assert not missing, f"docs/layout.md does not name {', '.join(missing)}: add a line for each to its map"


# Each check on a deliberately broken text, so that none of them can pass by matching nothing.
BROKEN = [
    (config_problems, "train with `configs/txl.py:no_such_preset`", "has no preset 'no_such_preset'"),
    (config_problems, "`configs/knn.py:cpu@model.knn.sise=0`", "did you mean 'model.knn.size'"),
    (config_problems, "`--config knn:nope`", "has no preset 'nope'"),
    (config_problems, "`configs/txl.py:cpu` (`wt103`, `wt104`, ...)", "has no preset 'wt104'"),
    (config_problems, "presets in `configs/knn.py`: `cpu`, `cpu_8192`/`cpu_9999`, and more", "has no preset 'cpu_9999'"),
    (override_problems, "`--config.model.num_layrs=4`", "unknown config key 'model.num_layrs'"),
    (override_problems, "`--config.train.steps=many`", "expects an integer"),
    (override_problems, "```\npython -m memtx.train --config.model.qk_norm maybe\n```", "expects true/false"),
    (override_problems, "set `model.knn.sizes` or `model.knn.size=4`", "unknown config key 'model.knn.sizes'"),
    (override_problems, "`--config.model.knn=1`", "is a section"),
    (path_problems, "run `scripts/no_such_script.sh`", "scripts/no_such_script.sh` does not exist"),
    (path_problems, "`benchmarks/{step_time,no_such}.py`", "benchmarks/no_such.py` does not exist"),
    (path_problems, "`python -m memtx.no_such_module`", "no module memtx.no_such_module"),
    (path_problems, "`memtx.layers.no_such_function`", "defines no 'no_such_function'"),
    (path_problems, "`memtx-no-such-command`", "is not in pyproject.toml"),
]
GOOD = [
    (config_problems, "`configs/txl.py:cpu` and `knn:cpu` and `lamemo.py:cpu_no_look_ahead@model.mem_len=32`"),
    (override_problems, "`--config.mesh.shape=2,2,2 --config.train.init_from=RUN --config.KEY=VALUE` `model.apply`"),
    (path_problems, "`memtx/memory/NAME.py` `python -m memtx.studies.{alpha,extrapolation}` `memtx.config.Config`"),
]


@pytest.mark.parametrize("check, text, expected", BROKEN, ids=[t for _, t, _ in BROKEN])
def test_each_check_reports_a_broken_reference(check, text, expected):
    problems, _ = check("scratch.md", text)
    assert any(expected in p and p.startswith("scratch.md:") for p in problems), problems


@pytest.mark.parametrize("check, text", GOOD, ids=[t for _, t in GOOD])
def test_each_check_passes_good_references_and_placeholders(check, text):
    problems, _ = check("scratch.md", text)
    assert not problems, problems


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A heading: with punctuation?\n")
    page = tmp_path / "docs" / "page.md"
    text = ("# Page\n\n[ok](other.md#a-heading-with-punctuation) [ok](#page) ![ok](other.md)\n"
            "[bad](missing.md) [bad](other.md#no-such-heading) [bad](#nowhere) <img src=\"figures/none.png\">\n"
            "```\n[not a link](in-a-code-block.md)\n```\n")
    page.write_text(text)
    problems, count = link_problems(page, text)
    assert count == 7, problems
    joined = "\n".join(problems)
    assert len(problems) == 4 and "missing.md" in joined and "#no-such-heading" in joined, joined
    assert "#nowhere" in joined and "figures/none.png" in joined, joined


def test_github_anchors():
    assert github_anchor("Does the kNN memory pay off at CPU scale? Not yet") == \
        "does-the-knn-memory-pay-off-at-cpu-scale-not-yet"
    assert github_anchor("Data at scale: seqio tasks, many hosts, exact resume") == \
        "data-at-scale-seqio-tasks-many-hosts-exact-resume"
    assert github_anchor("LaMemo (look-ahead memory)") == "lamemo-look-ahead-memory"
    assert anchors_of("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}
