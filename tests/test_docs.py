"""The docs run: every python code block and every shell command in README.md, recipes/README.md and
benchmarks/README.md, as written.

* The python blocks of one file run in order as one script (a later block may use an earlier block's names), in a
  fresh process, as if pasted into ``python`` started in the repository root.
* Each shell command (a line of a ``bash``/``sh``/``shell`` block, with its ``\\`` continuations) runs on its own in
  ``bash``, from the repository root; a command written the same way in both docs runs once.
* Skips: a block whose first line is a comment ``# gpu ...`` or ``# requires: ...`` is skipped with that line as the
  reason; in a shell block, such a comment line elsewhere skips the one command that follows it.

Everything runs on CPU (CUDA hidden), offline, with fresh Hugging Face and tokenization caches. The working directory
is a throw-away view of the repository (a folder of symlinks to its top-level entries, next to a link to
``../shared``), so that relative outputs such as ``runs/...`` land outside the checkout; ``/tmp/...`` paths in shell
commands are moved into that folder too, so that two runs never share an output directory.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "recipes/README.md", "benchmarks/README.md")
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell"}
SKIP_MARKER = re.compile(r"^#\s*(gpu\b.*|requires:.*)$", re.IGNORECASE)
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
# Generous: a 2-core CI machine shared with other jobs; these are the ceilings of a hung run, not expected times.
PYTHON_TIMEOUT_S = 600
SHELL_TIMEOUT_S = 600


@dataclass
class Block:
    path: str  # the markdown file, relative to the repository root
    line: int  # 1-based line of the block's first line of code
    lang: str
    code: str
    skip: str | None  # the marker line when the whole block is skipped


@dataclass
class Command:
    path: str
    line: int
    text: str
    skip: str | None


def parse_blocks(markdown: str, path: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` with a language tag, indentation removed."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[start:i]]
        i += 1
        if not lang:
            continue  # an output listing, not code
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
        skip = first if SKIP_MARKER.match(first) else None
        blocks.append(Block(path, start + 1, lang, code, skip))
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """The commands of a shell block: continuation lines joined; a marker comment skips the command after it."""
    commands, pending_skip, lines, i = [], None, block.code.splitlines(), 0
    while i < len(lines):
        line, lineno = lines[i].strip(), block.line + i
        i += 1
        if not line:
            continue
        if line.startswith("#"):
            if SKIP_MARKER.match(line):
                pending_skip = line
            continue
        parts = [line]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1].rstrip()
            parts.append(lines[i].strip())
            i += 1
        commands.append(Command(block.path, lineno, " ".join(parts), block.skip or pending_skip))
        pending_skip = None
    return commands


def _read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def _doc_blocks(path: str) -> list[Block]:
    return parse_blocks(_read(path), path)


def _all_commands() -> list[Command]:
    return [c for path in DOCS for b in _doc_blocks(path) if b.lang in SHELL_LANGS for c in shell_commands(b)]


# ---------------------------------------------------------------------------------------------------------------
# Running code the way a reader would
# ---------------------------------------------------------------------------------------------------------------

_RUNNER = """\
import json, sys, traceback
sys.path.insert(0, "")  # as in an interactive session started in the repository root
namespace = {"__name__": "__main__"}
for origin, code in json.load(open(sys.argv[1])):
    print(f"--- running {origin}", flush=True)
    try:
        exec(compile(code, origin, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"--- FAILED: {origin}", flush=True)
        sys.exit(1)
print("--- all blocks ran", flush=True)
"""


def repo_view(tmp_path) -> str:
    """A working directory that looks like the repository root (symlinks), with ``../shared`` beside it."""
    view = tmp_path / "repo"
    view.mkdir(parents=True)
    for name in os.listdir(REPO_ROOT):
        if name not in (".git", "runs"):
            os.symlink(os.path.join(REPO_ROOT, name), view / name)
    shared = os.path.realpath(os.path.join(REPO_ROOT, "..", "shared"))
    if os.path.isdir(shared):
        os.symlink(shared, tmp_path / "shared")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return str(view)


def docs_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TRITON_"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"), MOSAIC_BERT_CACHE=str(tmp_path / "tokenization_cache"),
        CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", PYTHONPATH="", MPLBACKEND="Agg",
    )
    return env


def run_python_blocks(blocks: list[Block], tmp_path, timeout=PYTHON_TIMEOUT_S) -> subprocess.CompletedProcess:
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps([(f"{b.path}, code block at line {b.line}", b.code) for b in blocks]))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(_RUNNER)
    return subprocess.run([sys.executable, str(runner), str(script)], cwd=repo_view(tmp_path), env=docs_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def sandboxed(command: str, tmp_path) -> str:
    """``/tmp/...`` paths moved into this test's folder (output folders of two runs never collide)."""
    return re.sub(r"(?<![\w./-])/tmp/", f"{tmp_path}/tmp/", command)


def run_shell_command(command: str, tmp_path, timeout=SHELL_TIMEOUT_S) -> subprocess.CompletedProcess:
    cwd = repo_view(tmp_path)
    return subprocess.run(["bash", "-eo", "pipefail", "-c", sandboxed(command, tmp_path)], cwd=cwd,
                          env=docs_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _failure(proc: subprocess.CompletedProcess) -> str:
    return (f"exit status {proc.returncode}\n--- stdout (end)\n{proc.stdout[-4000:]}\n"
            f"--- stderr (end)\n{proc.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------------------------
# The docs
# ---------------------------------------------------------------------------------------------------------------


def _python_params():
    params = []
    for path in DOCS:
        blocks = [b for b in _doc_blocks(path) if b.lang in PYTHON_LANGS]
        if blocks:
            params.append(pytest.param(path, blocks, id=path))
    return params


def _shell_params():
    params, seen = [], set()
    for c in _all_commands():
        if c.text in seen:
            continue  # the same command in both docs runs once
        seen.add(c.text)
        marks = [pytest.mark.slow] + ([pytest.mark.skip(reason=f"{c.path}:{c.line}: {c.skip}")] if c.skip else [])
        params.append(pytest.param(c, id=f"{c.path}:{c.line}", marks=marks))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("path,blocks", _python_params())
def test_python_blocks_of_a_doc_run_in_order_as_one_script(path, blocks, tmp_path):
    runnable = [b for b in blocks if not b.skip]
    if not runnable:
        pytest.skip(f"every python block of {path} is marked: {[b.skip for b in blocks]}")
    proc = run_python_blocks(runnable, tmp_path)
    assert proc.returncode == 0, f"{path}: a python block failed\n{_failure(proc)}"
    assert "--- all blocks ran" in proc.stdout


@pytest.mark.parametrize("command", _shell_params())
def test_shell_command_of_a_doc_runs(command, tmp_path):
    proc = run_shell_command(command.text, tmp_path)
    assert proc.returncode == 0, f"{command.path}:{command.line}: `{command.text}` failed\n{_failure(proc)}"


def test_docs_have_runnable_python_blocks_and_shell_commands():
    """Guards the guards: if parsing broke (or every block got marked), the tests above would pass vacuously."""
    python_blocks = [b for b in _doc_blocks("README.md") if b.lang in PYTHON_LANGS and not b.skip]
    assert len(python_blocks) >= 2, "README.md should show loading and fine-tuning in runnable python blocks"
    commands = [c for c in _all_commands() if not c.skip]
    assert any("scripts/fill_mask.py" in c.text for c in commands), [c.text for c in commands]
    for path in DOCS:
        text = _read(path)
        fences = sum(1 for ln in text.splitlines() if ln.strip().startswith("```"))
        assert fences % 2 == 0, f"{path}: an unclosed code fence"


def _requirement_names(path: str) -> set[str]:
    names = set()
    for line in _read(path).splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= _requirement_names(os.path.join(os.path.dirname(path), line[3:].strip()))
        elif line:
            names.add(_normalise(re.match(r"[A-Za-z0-9._-]+", line).group(0)))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed distributions only, extras left out)."""
    from importlib.metadata import PackageNotFoundError, requires

    closure, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs if "extra ==" not in r]
    return closure


def _imported_modules(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_python_blocks_import_only_what_the_requirements_install():
    """A block that imports a library the requirements files do not name runs here but fails on a fresh install."""
    from importlib.metadata import packages_distributions

    provided = _with_dependencies(_requirement_names("requirements-test.txt"))
    distributions = packages_distributions()
    missing = []
    for path in DOCS:
        for block in _doc_blocks(path):
            if block.lang not in PYTHON_LANGS or block.skip:
                continue
            for module in sorted(_imported_modules(block.code)):
                local = os.path.exists(os.path.join(REPO_ROOT, module + ".py")) or os.path.isdir(
                    os.path.join(REPO_ROOT, module))
                if module in sys.stdlib_module_names or local:
                    continue
                if not {_normalise(d) for d in distributions.get(module, [])} & provided:
                    missing.append(f"{path}:{block.line} imports {module}")
    assert not missing, f"not installed by requirements.txt / requirements-test.txt: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# The machinery itself (fast, no model)
# ---------------------------------------------------------------------------------------------------------------

_SAMPLE = """\
Text.

```python
x = 1
```

```
output, not code
```

  ```python
  # gpu: needs CUDA
  import torch; torch.ones(1, device="cuda")
  ```

```bash
# a plain comment
echo one \\
    two
# requires: 8 GPUs
torchrun --nproc_per_node 8 train.py
echo three > /tmp/out.txt
```
"""


def test_parser_finds_blocks_markers_and_continued_commands():
    blocks = parse_blocks(_SAMPLE, "sample.md")
    assert [(b.lang, b.line, b.skip) for b in blocks] == [
        ("python", 4, None), ("python", 12, "# gpu: needs CUDA"), ("bash", 17, None)]
    assert blocks[1].code.startswith("# gpu")
    commands = shell_commands(blocks[2])
    assert [(c.text, c.line, c.skip) for c in commands] == [
        ("echo one two", 18, None),
        ("torchrun --nproc_per_node 8 train.py", 21, "# requires: 8 GPUs"),
        ("echo three > /tmp/out.txt", 22, None),
    ]


def test_import_scan_sees_a_library_outside_the_requirements():
    assert _imported_modules("import os\nfrom datasets import Dataset\nimport torch.nn as nn\n") == {
        "os", "datasets", "torch"}
    assert "datasets" not in _with_dependencies(_requirement_names("requirements-test.txt"))


def test_whole_shell_block_is_skipped_by_a_marker_on_its_first_line():
    block = parse_blocks("```bash\n# gpu: one H100\npython a.py\n# next\npython b.py\n```\n", "x.md")[0]
    assert [c.skip for c in shell_commands(block)] == ["# gpu: one H100", "# gpu: one H100"]


def test_python_blocks_share_names_and_a_failing_block_fails_naming_its_line(tmp_path):
    blocks = [Block("doc.md", 3, "python", "value = 20\n", None),
              Block("doc.md", 9, "python", "assert value == 20\nraise TypeError('unexpected keyword')\n", None)]
    proc = run_python_blocks(blocks, tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "--- FAILED: doc.md, code block at line 9" in proc.stdout
    assert 'File "doc.md, code block at line 9", line 2' in proc.stderr and "TypeError" in proc.stderr


def test_shell_command_fails_on_error_and_keeps_tmp_outputs_in_its_own_folder(tmp_path):
    assert run_shell_command("false | cat", tmp_path / "a", timeout=60).returncode != 0
    ok = run_shell_command("ls scripts/test.sh && echo hi > /tmp/docs_test_out.txt", tmp_path / "b", timeout=60)
    assert ok.returncode == 0, _failure(ok)
    assert (tmp_path / "b" / "tmp" / "docs_test_out.txt").read_text() == "hi\n"
