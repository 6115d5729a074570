"""README.md, docs/*.md and data/README.md still match the code and the files they name.

What is read. A page's fenced blocks and its inline code spans (`...`), never its plain prose. A fenced block
tagged bash/sh/shell/console holds commands, one a line (a trailing backslash or an open quote joins the next
line; `#` starts a comment); in an untagged block (program output) only lines starting with `$ ` are commands.
Every inline code span is read as a command too, and placeholders <...> become X.

The checks, each of which fails with every offending page:line listed:
1. Commands. In a command, the words after the first word that ends in `qml.py` are qml.py's arguments (the
   words before, python or torchrun or srun or mpiexec and their options, are the launcher's), up to `|`, `;`,
   `&&` or a redirection. They must parse with `qml.get_args_parser()`; `report` first: they must parse with
   `report.get_args_parser()` (RUNDIR, `--by OPTION`); `predict` first: with `predict.get_args_parser()`
   (MODEL, IMAGE_OR_FOLDER..., its options). `bench.py` arguments must parse with
   `bench.get_args_parser()`. After
   `submit_qml.sbatch`: an optional task count (4, 1,2,4,8, or a placeholder), the launcher's own options (those
   of sweep.py's parser, e.g. `--repeats K` with K a positive integer, `--continue DIR`, `--vary OPTION=V1,V2`
   with OPTION a qml.py option), and the rest must parse as qml.py's. After `build_frontier_env.sh`, options
   must be in its `case` patterns. Options must be spelled in full (argparse would take a prefix). Placeholders
   (an upper-case word such as DIR, PATH, ENV, N; X for <...>; `...`) are accepted as any value: the check puts a
   valid value of that option in their place. `[` and `]` around words are usage brackets, dropped.
2. Options named. An inline code span that starts with `--` names options; each `--name` in it must be an option
   of one of this project's programs (qml.py, bench.py, submit_qml.sbatch, build_frontier_env.sh) or one of the
   sbatch/srun/torchrun/python options listed in OTHER_PROGRAMS_OPTIONS (add a new one there, with its program).
   Such a span does not say whose option it is, so it is only checked to exist somewhere; options inside
   commands are attributed by check 1. docs/options.md's table of options is qml.py's: every `--name` in its
   first column is a qml.py option, and every qml.py option has a row.
3. Files. A word of a command or an inline span that looks like a repository path (its first folder is one of
   the repository's, e.g. tests/ or docs/, or it is a single name ending in .py, .sh, .sbatch, .md, .txt or .toml)
   must exist, relative to the repository root (so name files by their path: `tests/conftest.py`). Words with
   $, <, *, {, ~ or :, absolute paths and RUNTIME_PATHS (made at run time, ignored by git) are not checked.
4. Links. Every relative markdown link target exists, relative to its page, and its #anchor is a heading of
   the target page (GitHub's slugs: lower case, punctuation but - and _ dropped, spaces to -).
5. README.md is at most 250 lines.
6. .ci/run's commands are README's: each of its command lines is a line of a fenced block in README.md.
7. Tests named. Every span naming a test (`test_...`, where … stands for any part of a name) is a test function
   in tests/.
"""

import argparse
import re
import shlex
from pathlib import Path

import pytest

import bench
from machinery import command_line, predict
import qml
from machinery import report, sweep

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
README_MAX_LINES = 250
QML_PARSER = qml.get_args_parser()
REPORT_PARSER = report.get_args_parser()
PREDICT_PARSER = predict.get_args_parser()
BENCH_PARSER = bench.get_args_parser()

# Options of other programs that the pages name in inline spans, by program.
OTHER_PROGRAMS_OPTIONS = {
    "sbatch": {"--export", "--exclusive", "--requeue", "--open-mode", "--signal", "--network", "--cpus-per-task"},
    "srun": {"--gpus-per-task", "--gpu-bind", "--ntasks-per-node", "--network", "--kill-on-bad-exit"},
    "torchrun": {"--nproc-per-node"},
    "python -m venv": {"--clear"},
}
# Paths that the programs make at run time, ignored by git: named in the pages but not in a fresh clone.
RUNTIME_PATHS = ("data/hymenoptera_data",)
REPO_EXTENSIONS = (".py", ".sh", ".sbatch", ".md", ".txt", ".toml")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
STOP_WORDS = {"|", "||", "&&", ";", "&"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|\.\.\.")
TASK_COUNTS = re.compile(r"^\d+(,\d+)*$")


# ----------------------------------------------------------------------------
# Reading the pages


def fenced_blocks(text):
    """(language, first line number, body) of every ``` block."""
    return [(match.group(1), text.count("\n", 0, match.start()) + 2, match.group(2))
            for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def prose(text):
    """The page with its fenced blocks blanked (their newlines kept, so line numbers stay)."""
    return re.sub(r"^```.*?^```", lambda match: "\n" * match.group(0).count("\n"), text, flags=re.M | re.S)


def inline_spans(text):
    """(line number, text) of every inline code span outside fenced blocks; one that wraps is joined."""
    body = prose(text)
    return [(body.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split()))
            for match in re.finditer(r"(`+)(.+?)\1", body, re.S) if "\n\n" not in match.group(2)]


def block_commands(language, first_line, body):
    """(line number, command) of a fenced block: every logical line of a shell block, the `$ ` lines of others."""
    commands, pending, start = [], "", first_line
    for number, line in enumerate(body.split("\n"), first_line):
        if not pending:
            start = number
            if language not in SHELL_BLOCKS:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        commands.append((start, pending))
        pending = ""
    return commands


def page_commands(text):
    """(line number, command) of every command of a page: its shell blocks' lines and its inline spans."""
    commands = [command for language, first, body in fenced_blocks(text)
                for command in block_commands(language, first, body)]
    return commands + inline_spans(text)


def words(command):
    """The command's shell words, <...> as X; None when it cannot be split (an unbalanced quote)."""
    try:
        return shlex.split(re.sub(r"<[^<>]*>", "X", command), comments=True)
    except ValueError:
        return None


def program_arguments(tokens, program):
    """The words after the first one naming `program` (a path ending in it), up to a shell operator; None when
    no word names it."""
    for index, token in enumerate(tokens):
        if token == program or token.endswith("/" + program):
            arguments = []
            for word in tokens[index + 1:]:
                if word in STOP_WORDS or re.match(r"^\d?>", word):
                    break
                word = word.strip("[]")
                if word and word != "...":
                    arguments.append(word)
            return arguments
    return None


def each_page():
    for page in PAGES:
        yield page.relative_to(ROOT).as_posix(), page.read_text()


def each_command(program):
    """(where, command, arguments) of every command of every page that runs `program`."""
    for name, text in each_page():
        for line, command in page_commands(text):
            tokens = words(command)
            if tokens is None:
                if program in command:
                    yield f"{name}:{line}", command, None
                continue
            arguments = program_arguments(tokens, program)
            if arguments is not None:
                yield f"{name}:{line}", command, arguments


# ----------------------------------------------------------------------------
# Parsing a program's arguments


def value_for(action):
    """A value the option accepts, put in place of a placeholder."""
    candidates = [*(action.choices or ()), action.default, "1", "auto"]
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            if action.type is not None:
                action.type(str(candidate))
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        if not action.choices or candidate in action.choices:
            return str(candidate)
    return "1"


def with_placeholders_filled(parser, arguments):
    """The arguments with each placeholder value replaced by a value its option accepts."""
    options = parser._option_string_actions
    filled, previous = [], None
    for word in arguments:
        name, equals, value = word.partition("=")
        if word.startswith("--") and equals and name in options and PLACEHOLDER.search(value):
            word = f"{name}={value_for(options[name])}"
        elif previous is not None and PLACEHOLDER.search(word):
            word = value_for(previous)
        action = options.get(word) if word.startswith("-") else None
        previous = action if action is not None and action.nargs != 0 else None
        filled.append(word)
    return filled


def parse_error(parser, arguments, program):
    """None when the parser accepts the arguments (--help aside) and each --option is spelled in full (argparse
    would accept a prefix), else the complaint."""
    arguments = [word for word in arguments if word not in ("-h", "--help")]
    for word in arguments:
        if word.startswith("--") and word.partition("=")[0] not in parser._option_string_actions:
            return f"{word.partition('=')[0]} is not an option of {program}"
    try:
        parser.parse_args(with_placeholders_filled(parser, arguments))
    except command_line.UsageError as err:
        return str(err)
    except SystemExit as err:
        return f"exit {err.code}"
    return None


def qml_error(arguments):
    if arguments[:1] == ["report"]:
        return parse_error(REPORT_PARSER, arguments[1:], "qml.py report")
    if arguments[:1] == ["sweep"]:  # what submit_qml.sbatch runs: its arguments
        return launcher_error(arguments[1:])
    if arguments[:1] == ["predict"]:
        return parse_error(PREDICT_PARSER, arguments[1:], "qml.py predict")
    return parse_error(QML_PARSER, arguments, "qml.py")


def case_options(script):
    """The --options of a shell script's argument `case` patterns (`--name)`, `-h | --help)`, `--name=*)`)."""
    patterns = re.findall(r"^\s*((?:-[\w-]+(?:=\*)?\s*\|?\s*)+)\)", (ROOT / script).read_text(), re.M)
    return {option for pattern in patterns for option in re.findall(r"--[\w-]+", pattern)}


LAUNCHER_OPTIONS = {option for option in sweep.get_args_parser()._option_string_actions if option.startswith("--")}
BUILD_OPTIONS = case_options("build_frontier_env.sh")
QML_OPTIONS = {option for option in QML_PARSER._option_string_actions if option.startswith("--")}
REPORT_OPTIONS = {option for option in REPORT_PARSER._option_string_actions if option.startswith("--")}
BENCH_OPTIONS = {option for option in BENCH_PARSER._option_string_actions if option.startswith("--")}
PREDICT_OPTIONS = {option for option in PREDICT_PARSER._option_string_actions if option.startswith("--")}


def launcher_error(arguments):
    """None when the arguments after submit_qml.sbatch are a task count, its options and qml.py's."""
    if arguments and not arguments[0].startswith("-"):
        counts = arguments.pop(0)
        if not (TASK_COUNTS.match(counts) or PLACEHOLDER.search(counts)):
            return f"the first argument must be a task count or a comma list of them, not {counts!r}"
    qml_arguments = []
    while arguments:
        word = arguments.pop(0)
        name, equals, value = word.partition("=")
        if name in LAUNCHER_OPTIONS:
            if not equals:
                if not arguments:
                    return f"{name} needs a value"
                value = arguments.pop(0)
            if name == "--repeats" and not (PLACEHOLDER.search(value) or re.match(r"^[1-9]\d*$", value)):
                return f"--repeats needs a positive integer, not {value!r}"
            varied = value.partition("=")[0]
            if name == "--vary" and not PLACEHOLDER.search(varied) and f"--{varied}" not in QML_OPTIONS:
                return f"--vary {value}: --{varied} is not an option of qml.py"
        else:
            qml_arguments.append(word)
    return qml_error(qml_arguments)


# ----------------------------------------------------------------------------
# 1. Commands


def test_every_qml_py_command_parses_with_qml_py_s_parser():
    failures = [f"{where}: `{command}`: {'unbalanced quotes' if arguments is None else qml_error(arguments)}"
                for where, command, arguments in each_command("qml.py")
                if arguments is None or qml_error(arguments)]
    assert not failures, "\n".join(failures)


def test_every_bench_py_command_parses_with_bench_py_s_parser():
    failures = [f"{where}: `{command}`: {parse_error(BENCH_PARSER, arguments or [], 'bench.py')}"
                for where, command, arguments in each_command("bench.py")
                if arguments is None or parse_error(BENCH_PARSER, arguments, "bench.py")]
    assert not failures, "\n".join(failures)


def test_every_submit_qml_sbatch_command_uses_the_launcher_s_options_and_qml_py_s():
    assert {"--repeats", "--continue", "--vary"} <= LAUNCHER_OPTIONS  # sweep.py's parser was read
    failures = [f"{where}: `{command}`: {launcher_error(list(arguments or []))}"
                for where, command, arguments in each_command("submit_qml.sbatch")
                if arguments is None or launcher_error(list(arguments))]
    assert not failures, "\n".join(failures)


def test_every_build_frontier_env_sh_command_uses_its_options():
    assert {"--dry-run", "--build-dir"} <= BUILD_OPTIONS
    failures = [f"{where}: `{command}`: {word} is not an option of build_frontier_env.sh"
                for where, command, arguments in each_command("build_frontier_env.sh")
                for word in arguments or [] if word.startswith("--") and word.partition("=")[0] not in BUILD_OPTIONS]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------
# 2. Options named


def test_every_option_named_in_a_span_is_an_option_of_a_program():
    known = QML_OPTIONS | REPORT_OPTIONS | PREDICT_OPTIONS | BENCH_OPTIONS | LAUNCHER_OPTIONS | BUILD_OPTIONS
    known |= set().union(*OTHER_PROGRAMS_OPTIONS.values())
    failures = [f"{name}:{line}: `{span}`: {option} is no option of qml.py, bench.py, submit_qml.sbatch, "
                f"build_frontier_env.sh or {', '.join(OTHER_PROGRAMS_OPTIONS)}"
                for name, text in each_page() for line, span in inline_spans(text) if span.startswith("--")
                for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", span) if option not in known]
    assert not failures, "\n".join(failures)


def options_table_rows():
    """(line number, options) of each row of docs/options.md's table whose first column names options."""
    rows = []
    for number, line in enumerate((ROOT / "docs" / "options.md").read_text().split("\n"), 1):
        if line.startswith("| `--"):
            first_column = line.split("|")[1]
            rows.append((number, re.findall(r"--[a-z][\w-]*", first_column)))
    return rows


def test_options_table_lists_exactly_qml_py_s_options():
    rows = options_table_rows()
    named = {option for _, options in rows for option in options}
    failures = [f"docs/options.md:{line}: {option} is not a qml.py option"
                for line, options in rows for option in options if option not in QML_OPTIONS]
    failures += [f"docs/options.md: the table has no row for qml.py's {option}"
                 for option in sorted(QML_OPTIONS - named - {"--help"})]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------
# 3. Files


def repository_folders():
    """The repository's top-level folders: not hidden (but .ci), not made by runs or Python."""
    return {path.name for path in ROOT.iterdir() if path.is_dir()
            and (not path.name.startswith(".") or path.name == ".ci") and path.name not in ("runs", "__pycache__")}


def names_a_repository_path(word, folders):
    if re.search(r"[$<>*{}~:|=,()\s]", word) or word.startswith(("/", "..", "-")) or word == "X":
        return False
    path = word.rstrip("/")
    if path.startswith(RUNTIME_PATHS):
        return False
    first = path.split("/")[0]
    return first in folders if "/" in word else bool(re.match(r"^\w[\w.-]*$", path)) and path.endswith(REPO_EXTENSIONS)


def test_every_repository_path_named_exists():
    folders = repository_folders()
    failures = []
    for name, text in each_page():
        for line, command in page_commands(text):
            for word in words(command) or [command]:
                if names_a_repository_path(word.strip("[]"), folders) and not (ROOT / word.strip("[]")).exists():
                    failures.append(f"{name}:{line}: `{command}`: {word.strip('[]')} is not in the repository")
    assert not failures, "\n".join(sorted(set(failures)))


# ----------------------------------------------------------------------------
# 4. Links


def slug(heading):
    """GitHub's anchor of a heading: its text (link text, code without backticks) in lower case, characters
    other than letters, digits, _, - and spaces dropped, spaces turned into -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings, repeated ones numbered -1, -2, ... as GitHub does."""
    seen, result = {}, set()
    for match in re.finditer(r"^#{1,6} +(.+?) *#*$", prose(page.read_text()), re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        result.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return result


def link_problem(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return f"{path} does not exist"
    if ROOT not in file.parents and file != ROOT:
        return f"{path} is outside the repository"
    if anchor and (file.suffix != ".md" or anchor not in anchors(file)):
        return f"#{anchor} is no heading of {file.relative_to(ROOT).as_posix()}"
    return None


def test_every_relative_link_and_its_anchor_resolves():
    failures = []
    for page in PAGES:
        body = re.sub(r"(`+).+?\1", lambda match: " " * len(match.group(0)), prose(page.read_text()), flags=re.S)
        for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", body):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            problem = link_problem(page, target)
            if problem:
                line = body.count("\n", 0, match.start()) + 1
                failures.append(f"{page.relative_to(ROOT).as_posix()}:{line}: ({target}): {problem}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------
# 5, 6, 7. README's length, CI's command, the tests named


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a docs/ page"


def test_ci_runs_readme_s_test_command():
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().split("\n")
                   if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]  # CI's own setup
    readme_lines = {line for _, _, body in fenced_blocks((ROOT / "README.md").read_text()) for line in body.split("\n")}
    assert ci_commands, ".ci/run runs no command"
    missing = [command for command in ci_commands if command not in readme_lines]
    assert not missing, f"these .ci/run commands are not README's: {missing}"


@pytest.fixture(scope="module")
def tests_source():
    """The text of tests/test_*.py, where the tests are defined."""
    return "\n".join(path.read_text() for path in sorted((ROOT / "tests").glob("test_*.py")))


def test_every_test_named_in_the_pages_exists(tests_source):
    failures = []
    for name, text in each_page():
        for line, span in inline_spans(text):
            if re.fullmatch(r"(test_|…_)[\w…]*", span):
                pattern = r"\w*".join(re.escape(part) for part in span.split("…"))
                if not re.search(rf"^\s*def {pattern}\(", tests_source, re.M):
                    failures.append(f"{name}:{line}: no test matches {span}")
    assert not failures, "\n".join(failures)
