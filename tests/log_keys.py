"""Every key the gateway puts on a log record, read from the source (tests/test_logs_shipping.py):
a test that logs one record of every kind the gateway emits is impossible, an AST walk is not."""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "gateway").rglob("*.py")), *sorted((ROOT / "handlers").rglob("*.py")), ROOT / "run.py"]
RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__)


@dataclass
class LogKeys:
    """Every key the gateway and its handlers put on a log record: the literal keys of each
    `extra=` argument, followed through the helpers that build it (`fields(message)`, a local dict
    filled in steps, `**kwargs` of a function such as `audit`, `request.get(KEY, {})` of a dict
    stored at `request[KEY]`), and the attributes a logging filter sets on `record`. An `extra=`
    this cannot follow is listed in `unresolved`, so a new shape of code fails the test instead of
    passing it unchecked."""

    keys: dict[str, set[str]] = field(default_factory=dict)  # key -> where
    unresolved: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
        self.scopes: dict[int, list[ast.AST]] = {}  # node id -> enclosing functions, innermost first, then module
        self.stored: dict[str, list[tuple[ast.expr, list[ast.AST]]]] = {}  # X[KEY] = value, by KEY's name
        self.calls: list[tuple[ast.Call, list[ast.AST], str]] = []
        self.modules: list[ast.Module] = []
        for path in SOURCES:
            module = ast.parse(path.read_text(), str(path))
            self.modules.append(module)
            self._index(module, [module], path.relative_to(ROOT).as_posix())
        for call, scope, where in self.calls:
            for kw in call.keywords:
                if kw.arg == "extra":
                    self._add(kw.value, scope, f"{where}:{call.lineno}", set())

    def _index(self, node: ast.AST, scope: list[ast.AST], where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.setdefault(child.name, []).append(child)
                inner = [child, *scope]
            self.scopes[id(child)] = inner
            if isinstance(child, ast.Call):
                self.calls.append((child, inner, where))
            if isinstance(child, ast.Assign):
                self._index_assignment(child, inner, where)
            self._index(child, inner, where)

    def _index_assignment(self, node: ast.Assign, scope: list[ast.AST], where: str) -> None:
        for target in node.targets:
            if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Name):
                self.stored.setdefault(target.slice.id, []).append((node.value, scope))  # request[KEY] = {...}
            elif _is_record_attribute(target):  # record.suppressed = ... in a logging.Filter
                assert isinstance(target, ast.Attribute)
                self.keys.setdefault(target.attr, set()).add(f"{where}:{node.lineno}")

    def _add(self, expr: ast.expr, scope: list[ast.AST], where: str, seen: set[int]) -> None:
        if id(expr) in seen:
            return
        seen.add(id(expr))
        if isinstance(expr, ast.Dict):
            for key, value in zip(expr.keys, expr.values, strict=True):
                if key is None:
                    self._add(value, scope, where, seen)
                elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                    self.keys.setdefault(key.value, set()).add(where)
                else:
                    self.unresolved.append(f"{where}: a key that is not a string literal")
        elif isinstance(expr, ast.IfExp):
            self._add(expr.body, scope, where, seen)
            self._add(expr.orelse, scope, where, seen)
        elif isinstance(expr, ast.Call):
            self._add_call(expr, scope, where, seen)
        elif isinstance(expr, ast.Name):
            self._add_name(expr.id, scope, where, seen)
        else:
            self.unresolved.append(f"{where}: {ast.unparse(expr)}")

    def _add_call(self, call: ast.Call, scope: list[ast.AST], where: str, seen: set[int]) -> None:
        func = call.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "dict":
            self._add_keywords(call, scope, where, seen)
        elif name == "get" and call.args and isinstance(key := call.args[0], ast.Name) and key.id in self.stored:
            for value, value_scope in self.stored[key.id]:  # request.get(AUDIT_DETAIL, {})
                self._add(value, value_scope, where, seen)
            for default in call.args[1:]:
                self._add(default, scope, where, seen)
        elif builders := [
            f for f in self.functions.get(name, []) if "dict" in ast.unparse(f.returns or ast.Constant(""))
        ]:
            for function in builders:  # the functions of that name that return a dict
                for node in ast.walk(function):
                    if isinstance(node, ast.Return) and node.value is not None:
                        self._add(node.value, [function, *self.scopes[id(function)]], where, seen)
        else:
            self.unresolved.append(f"{where}: {ast.unparse(call)}")

    def _add_keywords(self, call: ast.Call, scope: list[ast.AST], where: str, seen: set[int]) -> None:
        for kw in call.keywords:
            if kw.arg is None:
                self._add(kw.value, scope, where, seen)
            else:
                self.keys.setdefault(kw.arg, set()).add(where)

    def _add_name(self, name: str, scope: list[ast.AST], where: str, seen: set[int]) -> None:
        for owner in scope:
            found = False
            if _is_kwargs(owner, name):  # **fields: what every caller passes
                assert isinstance(owner, ast.FunctionDef | ast.AsyncFunctionDef)
                for call, call_scope, call_where in self.calls:
                    if isinstance(call.func, ast.Name) and call.func.id == owner.name:
                        self._add_keywords(call, call_scope, f"{call_where}:{call.lineno}", seen)
                return
            for node in ast.walk(owner) if not isinstance(owner, ast.Module) else owner.body:
                if self.scopes.get(id(node), [None])[0] is not owner and not isinstance(owner, ast.Module):
                    continue  # a nested function's own names
                if (value := _assigned(node, name)) is not None:
                    self._add(value, scope, where, seen)  # name = {...}
                elif (key := _subscript_key(node, name)) is not None:
                    self.keys.setdefault(key, set()).add(where)  # name["k"] = ...
                elif (update := _update_call(node, name)) is not None:
                    self._add_keywords(update, scope, where, seen)  # name.update(k=...)
                else:
                    continue
                found = True
            if found:
                return
        imported = [value for module in self.modules for node in module.body if (value := _assigned(node, name))]
        for value in imported:  # a constant imported from another module (SHOWS_CREDENTIAL)
            self._add(value, [], where, seen)
        if not imported:
            self.unresolved.append(f"{where}: {name}")


def _assigned(node: ast.AST, name: str) -> ast.expr | None:
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        return node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
        return node.value
    return None


def _subscript_key(node: ast.AST, name: str) -> str | None:
    """ "k" of `name["k"] = ...`."""
    if not (isinstance(node, ast.Assign) and isinstance(target := node.targets[0], ast.Subscript)):
        return None
    if isinstance(target.value, ast.Name) and target.value.id == name and isinstance(target.slice, ast.Constant):
        return str(target.slice.value)
    return None


def _is_kwargs(owner: ast.AST, name: str) -> bool:
    """Is `name` the `**kwargs` parameter of the function `owner`?"""
    if not isinstance(owner, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    return owner.args.kwarg is not None and owner.args.kwarg.arg == name


def _is_record_attribute(target: ast.expr) -> bool:
    """`record.x` as an assignment target, `x` not one of LogRecord's own attributes."""
    return (
        isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "record"
        and target.attr not in RECORD_ATTRIBUTES
    )


def _update_call(node: ast.AST, name: str) -> ast.Call | None:
    if isinstance(node, ast.Expr) and isinstance(call := node.value, ast.Call):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr == "update" and isinstance(func.value, ast.Name):
            return call if func.value.id == name else None
    return None
