"""The package's imports run one way, protobuf stays at the edge, and the client is slim."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "augserve"

# Which layers each layer may import (its own included). `_proto` is the generated stubs.
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "transport": {"core", "transport"},
    "backends": {"core", "backends"},
    "streaming": {"core", "data", "backends", "transport", "streaming"},
    "rpc": {"core", "data", "backends", "transport", "streaming", "rpc", "_proto"},
    "client": {"core", "transport", "rpc", "client", "_proto"},
    "cli": {"core", "data", "backends", "transport", "streaming", "rpc", "client", "cli"},
}
# Only these layers may see protobuf or gRPC.
WIRE_LAYERS = {"rpc", "client", "_proto"}
WIRE_MODULES = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "augserve._proto")
# The client may import only these modules of the rpc layer (no servicer, metrics or server).
CLIENT_RPC_MODULES = {
    "augserve.rpc",
    "augserve.rpc.compression",
    "augserve.rpc.convert",
    "augserve.rpc.keepalive",
    "augserve.rpc.security",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, only under TYPE_CHECKING) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_checking_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                type_checking_lines.add(getattr(child, "lineno", -1))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno in type_checking_lines) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno in type_checking_lines))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "augserve" and len(parts) > 1 else None


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if "_proto" not in path.parts)


def test_every_module_is_in_a_layer() -> None:
    top_level = {module_name(path) for path in SOURCES if layer_of(module_name(path)) is None}
    loose = {layer_of(module_name(path)) for path in SOURCES} - set(ALLOWED) - {None}
    assert top_level == {"augserve"} and loose == {"__main__"}, (top_level, loose)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_imports_run_one_way(path: Path) -> None:
    layer = layer_of(module_name(path))
    if layer not in ALLOWED:
        return  # augserve/__init__.py and __main__.py
    for imported, type_only in imports_of(path):
        target = layer_of(imported)
        if imported.startswith("augserve") and target is not None and not type_only:
            assert target in ALLOWED[layer], f"{module_name(path)} ({layer}) imports {imported} ({target})"
        if layer not in WIRE_LAYERS and layer != "cli":
            assert not imported.startswith(WIRE_MODULES), f"{module_name(path)} ({layer}) imports {imported}"
        if layer == "client" and target == "rpc":
            assert imported in CLIENT_RPC_MODULES, f"{module_name(path)} imports {imported}"


def test_producer_never_reaches_into_the_manager() -> None:
    """Producer threads decide only about themselves; the manager carries out group decisions."""
    path = PACKAGE / "streaming" / "producer.py"
    imported = {name for name, type_only in imports_of(path) if not type_only}
    assert not imported & {"augserve.streaming.manager", "augserve.streaming.session"}, imported
    code = ast.unparse(ast.parse(path.read_text(encoding="utf-8")))  # without comments
    assert "manager." not in code.replace("wake_manager", ""), "a producer calls into the manager"


# The codec libraries are optional: imported only when a stream asks for their codec.
FORBIDDEN_IN_CLIENT = ("cv2", "PIL", "nvidia.dali", "yaml", "prometheus_client", "torch", "zstandard", "lz4")
FORBIDDEN_PACKAGES = ("augserve.backends", "augserve.streaming", "augserve.data", "augserve.cli")


def test_client_import_loads_no_backend() -> None:
    """A trainer container installs only the client extra: `import augserve.client` must not
    load OpenCV, PIL, DALI, torch or any server part."""
    script = (
        "import json, sys, augserve.client\n"
        f"roots = {FORBIDDEN_IN_CLIENT + FORBIDDEN_PACKAGES!r}\n"
        "bad = [m for m in sys.modules if any(m == root or m.startswith(root + '.') for root in roots)]\n"
        "print(json.dumps(sorted(bad)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == []
