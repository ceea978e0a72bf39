"""The package's layout is its architecture (issue 15): GitLab → document → delivery → state, with the service beside.

Each folder is a layer; a module may import from its own layer and from the layers listed for it in
:data:`ALLOWED`, never from one above. Every import counts: at module level, inside a function, under
``if TYPE_CHECKING`` (a type from a higher layer is a dependency on it too), ``importlib.import_module`` and
``__import__`` with a literal name (one it cannot read is refused), and a chain such as
``gitlab_log_shipper.delivery.poster.ApiPoster`` after ``import gitlab_log_shipper``. The import graph has no
circles, and the libraries stay where they belong (python-gitlab in ``gitlab.rest``, nothing that talks to a
network in the document or the state, standard library included; graphql-core only in the simulator).

The checker is a plain function over source files, so the tests below also feed it a small package that breaks
each rule, to show that it can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from repo_paths import PACKAGE_DIR, REPO_ROOT, TESTS_DIR

PACKAGE = "gitlab_log_shipper"

# Modules every layer may use: one exception tree, times, secret handling, process-wide request counters, and
# the package root (its __version__).
SHARED = {"", "errors", "timeutil", "security", "counters"}

# Layer → the layers it may import from (besides itself). Lowest first.
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "document": {"shared"},  # pure: no settings, no HTTP, no state
    "state": {"shared"},
    "config": {"shared", "document"},  # LOG_REDACT_PATTERNS is checked with the redactor's own parser
    "gitlab": {"shared", "config"},
    "delivery": {"shared", "config", "document", "state"},  # knows nothing of GitLab
    "shipper": {"shared", "config", "document", "state", "gitlab", "delivery"},
    "service": {"shared", "config", "document", "state", "gitlab", "delivery", "shipper"},
    "cli": {"shared", "config", "document", "state", "gitlab", "delivery", "shipper", "service"},
    "sim": set(),  # the stand-ins share nothing with what they stand in for
}
FOLDERS = {"config", "document", "state", "gitlab", "delivery", "service", "sim"}
TOP = {"shipper": "shipper", "cli": "cli", "__main__": "cli"}

# Third-party modules → the layers (or single modules) allowed to import them.
THIRD_PARTY: dict[str, set[str]] = {
    "gitlab": {"gitlab.rest"},  # python-gitlab
    "requests": {"gitlab", "delivery", "service"},
    "urllib3": {"gitlab", "delivery", "service"},
    "graphql": {"sim"},  # graphql-core: the simulator's GraphQL API; the shipper sends plain JSON
    "click": {"cli", "sim"},  # the commands; the simulator's own command line
    "schedule": {"service"},
}
# What talks to a network, standard library included: never in the document or the state.
NETWORK = ("requests", "urllib3", "gitlab", "graphql", "http", "socket", "ssl", "urllib.request", "asyncio",
           "ftplib", "smtplib", "xmlrpc")
OFFLINE_LAYERS = {"document", "state"}
DYNAMIC = {"import_module", "__import__"}  # importlib.import_module / __import__: followed when the name is literal


def layer_of(module: str) -> str | None:
    """``module`` is relative to the package (``""`` for the package itself, ``service.check``)."""
    head = module.split(".")[0]
    if module in SHARED:
        return "shared"
    if head in FOLDERS:
        return head
    return TOP.get(module)


def module_name(package_dir: Path, path: Path) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _longest_module(package_dir: Path, parts: list[str]) -> list[str]:
    """The longest prefix of ``parts`` that is a module of the package (``delivery.poster.ApiPoster`` → its module;
    ``[]``, the package itself, for ``__version__``)."""
    for end in range(len(parts), 0, -1):
        where = package_dir.joinpath(*parts[:end])
        if where.with_suffix(".py").is_file() or (where / "__init__.py").is_file():
            return parts[:end]
    return []


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a plain chain of names."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return None


def imports_of(package_dir: Path, path: Path) -> tuple[set[str], set[str], list[str]]:
    """(modules of the package, other modules, imports that cannot be followed) of ``path``, wherever in the file:
    import statements at any depth (functions, ``if TYPE_CHECKING``), ``importlib.import_module`` and
    ``__import__`` calls, and attribute chains such as ``gitlab_log_shipper.delivery.poster.ApiPoster``."""
    name = module_name(package_dir, path)
    here = name.split(".") if name else []
    package = here if path.name == "__init__.py" else here[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    opaque: list[str] = []

    def absolute(module: str, level: int) -> None:
        if level:
            if level - 1 > len(package):
                raise AssertionError(f"{path}: relative import beyond the package")
            parts = package[:len(package) - (level - 1)] + (module.split(".") if module else [])
        elif module == PACKAGE or module.startswith(PACKAGE + "."):
            parts = module.split(".")[1:]
        else:
            outside.add(module)
            return
        inside.add(".".join(_longest_module(package_dir, parts)))

    tree = ast.parse(path.read_text("utf-8"), str(path))
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}  # a.b of a.b.c
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                absolute(alias.name, 0)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if not node.level and not (module == PACKAGE or module.startswith(PACKAGE + ".")):
                outside.add(module)
                continue
            for alias in node.names:  # `from . import health` imports a module; `from .x import y` a name of x
                absolute(".".join(filter(None, [module, alias.name])), node.level)
        elif isinstance(node, ast.Call):
            function = _dotted(node.func)
            if not function or function[-1] not in DYNAMIC:
                continue
            target = node.args[0] if node.args else None
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                level = len(target.value) - len(target.value.lstrip("."))
                absolute(target.value.lstrip("."), level)
            else:
                opaque.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _dotted(node)
            if chain and chain[0] == PACKAGE:
                inside.add(".".join(_longest_module(package_dir, chain[1:])))
    inside.discard(name)
    return inside, outside, opaque


def problems(package_dir: Path) -> list[str]:
    """Every breach of the layering, the circles and the third-party rules, one line each."""
    found: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        name = module_name(package_dir, path)
        layer = layer_of(name)
        inside, outside, opaque = imports_of(package_dir, path)
        graph[name] = inside
        if layer is None:
            found.append(f"{name or PACKAGE}: in no layer (put it in a folder, or name it in tests/test_layers.py)")
            continue
        found.extend(f"{name}: an import the layering check cannot follow ({call}); name the module literally"
                     for call in opaque)
        for target in sorted(inside):
            target_layer = layer_of(target)
            if target_layer is None:
                found.append(f"{name} imports {target}, which is in no layer")
            elif target_layer != layer and target_layer not in ALLOWED[layer]:
                found.append(f"{name} ({layer}) imports {target} ({target_layer}): {layer} may use "
                             f"{', '.join(sorted(ALLOWED[layer])) or 'nothing of the package'}")
        for library in sorted({module.split(".")[0] for module in outside} & set(THIRD_PARTY)):
            if layer not in THIRD_PARTY[library] and name not in THIRD_PARTY[library]:
                found.append(f"{name} imports {library}, which only {', '.join(sorted(THIRD_PARTY[library]))} may")
        if layer in OFFLINE_LAYERS:
            for module in sorted(outside):
                if any(module == net or module.startswith(net + ".") for net in NETWORK):
                    found.append(f"{name} ({layer}) imports {module}: {layer} knows nothing of the network")
    found.extend(f"import circle: {' → '.join(circle)}" for circle in circles(graph))
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_keeps_its_layers() -> None:
    assert problems(PACKAGE_DIR) == []


def test_every_module_is_in_a_layer_and_every_folder_is_a_layer() -> None:
    folders = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert folders == FOLDERS
    for path in PACKAGE_DIR.rglob("*.py"):
        assert layer_of(module_name(PACKAGE_DIR, path)) is not None, path


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_each_folder_says_what_lives_there_and_what_it_may_use(folder: str) -> None:
    init = PACKAGE_DIR / folder / "__init__.py"
    tree = ast.parse(init.read_text("utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring, f"{init} has no docstring"
    summary = docstring.split("\n\n")[0].splitlines()  # two lines: what lives there, then what it may use
    assert len(summary) == 2 and "may use" in summary[1].lower(), docstring
    if folder != "sim":  # the folders are namespaces only: importing one loads nothing
        assert len(tree.body) == 1, f"{init} holds code besides its docstring"
    for module in (PACKAGE_DIR / folder).glob("*.py"):
        if module.stem not in ("__init__", "__main__") and not module.stem.startswith("_"):
            assert module.stem in summary[0], f"{init}'s first line does not name {module.stem}"


def test_the_tests_mirror_the_folders() -> None:
    data = {"cassettes", "logs", "tls", "__pycache__"}
    test_folders = {p.name for p in TESTS_DIR.iterdir() if p.is_dir() and p.name not in data}
    assert test_folders == FOLDERS
    for folder in test_folders:
        assert list((TESTS_DIR / folder).glob("test_*.py")), folder
        # no __init__.py: pytest would then import tests/gitlab as the package `gitlab`, hiding python-gitlab
        assert not (TESTS_DIR / folder / "__init__.py").exists()
    names = [p.name for p in TESTS_DIR.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test modules of one name (pytest's rootdir-less import mode needs them unique)"


def test_the_readme_tree_names_every_module() -> None:
    readme = (REPO_ROOT / "README.md").read_text("utf-8")
    tree = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}  # "service" → its line and the deeper-indented lines that continue it
    current = ""
    for line in tree.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            current = line.split()[0].rstrip("/")
        entries[current] = entries.get(current, "") + " " + line
    for path in PACKAGE_DIR.rglob("*.py"):
        if path.stem in ("__init__", "__main__") or path.stem.startswith("_"):
            continue
        folder = path.parent.relative_to(PACKAGE_DIR).as_posix()
        if folder == ".":
            assert f"{path.name}" in tree, f"README's Layout does not show {path.name}"
        else:
            assert path.stem in entries.get(folder, ""), f"README's Layout does not name {folder}/{path.name}"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != "__init__.py" and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text('"""x"""\n')
        path.write_text(source)
    return root


def test_the_checker_fails_a_lower_layer_importing_a_higher_one(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "delivery/poster.py": "import requests\n",
        "document/payload.py": "def f():\n    from ..delivery.poster import x\n",  # inside a function: counted
        "state/store.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gitlab_log_shipper.gitlab import rest\n",
        "gitlab/rest.py": "import gitlab\n",
        "delivery/outbox.py": "from ..gitlab.rest import GitLabSource\n",
        "shipper.py": "from .service import daemon\n",
        "service/daemon.py": "",
    })
    assert problems(root) == [
        "delivery.outbox (delivery) imports gitlab.rest (gitlab): delivery may use config, document, shared, state",
        "document.payload (document) imports delivery.poster (delivery): document may use shared",
        "shipper (shipper) imports service.daemon (service): shipper may use config, delivery, document, gitlab, "
        "shared, state",
        "state.store (state) imports gitlab.rest (gitlab): state may use shared",
    ]


def test_the_checker_follows_dynamic_and_attribute_imports_and_knows_the_network(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "delivery/poster.py": "class ApiPoster: ...\n",
        "document/payload.py": "import importlib\nimportlib.import_module('gitlab_log_shipper.delivery.poster')\n",
        "document/spool.py": "__import__('gitlab_log_shipper.delivery.poster', fromlist=['x'])\n",
        "document/redact.py": "import gitlab_log_shipper\ndef f():\n    return gitlab_log_shipper.delivery.poster.ApiPoster\n",
        "config/settings.py": "from importlib import import_module\nimport_module('..shipper', __package__)\n",
        "shipper.py": "",
        "sim/world.py": "import importlib\nname = 'gitlab_log_shipper.errors'\nimportlib.import_module(name)\n",
        "state/store.py": "import http.client, socket\nfrom urllib.request import urlopen\nfrom urllib.parse import quote\n",
    })
    assert problems(root) == [
        "config.settings (config) imports shipper (shipper): config may use document, shared",
        "document.payload (document) imports delivery.poster (delivery): document may use shared",
        "document.redact (document) imports delivery.poster (delivery): document may use shared",
        "document.spool (document) imports delivery.poster (delivery): document may use shared",
        "sim.world: an import the layering check cannot follow (line 3: importlib.import_module(name)); name the "
        "module literally",
        "state.store (state) imports http.client: state knows nothing of the network",
        "state.store (state) imports socket: state knows nothing of the network",
        "state.store (state) imports urllib.request: state knows nothing of the network",
    ]


def test_the_checker_fails_circles_strays_and_misplaced_libraries(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "errors.py": "from .timeutil import utcnow\n",
        "timeutil.py": "from . import errors\n",
        "helpers.py": "",
        "document/redact.py": "import urllib3\n",
        "delivery/poster.py": "import gitlab\nfrom .. import helpers\n",
    })
    assert problems(root) == [
        "delivery.poster imports helpers, which is in no layer",
        "delivery.poster imports gitlab, which only gitlab.rest may",
        "document.redact imports urllib3, which only delivery, gitlab, service may",
        "document.redact (document) imports urllib3: document knows nothing of the network",
        "helpers: in no layer (put it in a folder, or name it in tests/test_layers.py)",
        "import circle: errors → timeutil → errors",
    ]
