"""The typed stub _fastserial.pyi names exactly what the native module exports."""

import ast
import inspect
import pathlib

import fastserial._fastserial as native

STUB = pathlib.Path(native.__file__).with_name("_fastserial.pyi")


def _stub_tree():
    return ast.parse(STUB.read_text())


def _public(names):
    return {n for n in names if not n.startswith("_")}


def test_stub_lists_every_export_and_nothing_else():
    tree = _stub_tree()
    stub_names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stub_names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub_names.add(node.target.id)
    runtime = _public(dir(native))
    assert _public(stub_names) == runtime


def test_stub_classes_have_the_runtime_methods():
    for node in _stub_tree().body:
        if not isinstance(node, ast.ClassDef) or node.name == "CheckpointError":
            continue
        cls = getattr(native, node.name)
        stub_methods = _public(
            n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__buffer__"
        )
        runtime = _public(name for name, _ in inspect.getmembers(cls) if not name.startswith("__"))
        assert stub_methods - {"__init__"} == runtime, node.name


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(native.CheckpointError, RuntimeError)


def _stub_params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return [n for n in names if n not in ("self", "cls")]


def _runtime_params(obj) -> list[str] | None:
    text = getattr(obj, "__text_signature__", None)
    if not text:
        return None
    sig = inspect.signature(obj)
    return [n for n in sig.parameters if n not in ("self", "cls", "$self", "$cls")]


def test_stub_signatures_match_the_runtime():
    """Every native function and method the stub declares takes the parameters the
    compiled module says it takes (PyO3's ``__text_signature__``), in order."""
    checked = 0
    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            pairs = [(node, getattr(native, node.name))]
        elif isinstance(node, ast.ClassDef) and node.name != "CheckpointError":
            cls = getattr(native, node.name)
            pairs = [
                (n, cls if n.name == "__init__" else getattr(cls, n.name))
                for n in node.body
                if isinstance(n, ast.FunctionDef) and n.name != "__buffer__"
            ]
        else:
            continue
        for fn, obj in pairs:
            runtime = _runtime_params(obj)
            if runtime is None:
                continue
            assert _stub_params(fn) == runtime, f"{node.name}.{fn.name}"
            checked += 1
    assert checked >= 20, checked


def test_the_native_module_is_built_for_the_stable_abi():
    """One wheel for every CPython >= 3.11: the module is built with pyo3's abi3
    feature (``maturin build --release`` then makes a ``cp311-abi3`` wheel)."""
    assert pathlib.Path(native.__file__).name.endswith(".abi3.so"), native.__file__
