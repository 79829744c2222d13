"""Import circles in the library: between files, and between its sub-packages.

    python -m tools.import_circles [--root research]

Reads every ``.py`` under the root (imports anywhere in a file count, lazy and type-only ones
included) and prints the strongly connected groups of files, then of sub-packages
(``research.core``, ``research.attention``, ...), that import each other, with one import that
closes each package circle. The library's floors (bottom up: core, data, kernels with the XLA
references they equal, attention, models, recipes, the method areas) allow none. Exit status 1
when a circle exists.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict

ALLOWED: set[frozenset[str]] = set()  # package circles the floors allow: none


def module_files(root: str) -> dict[str, str]:
    """{dotted module name: path} of every .py under ``root`` (a package's __init__ is the package)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(root) or ".").replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def import_edges(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: modules of the library it imports}; ``from pkg import sub`` counts as importing pkg.sub
    (not pkg) when sub is a module."""
    edges = defaultdict(set)
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def circles(edges: dict[str, set[str]], nodes) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop(); on_stack.discard(member); group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return sorted(found)


def package_of(module: str, root: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else root


def report(root: str = "research") -> tuple[list[list[str]], list[list[str]], dict]:
    """(file circles, package circles, {(package, package): an import between them})."""
    modules = module_files(root)
    edges = import_edges(modules)
    package_edges, example = defaultdict(set), {}
    for source, targets in edges.items():
        for target in targets:
            a, b = package_of(source, root), package_of(target, root)
            if a != b and root not in (a, b):
                package_edges[a].add(b)
                example.setdefault((a, b), f"{source} -> {target}")
    packages = {package_of(m, root) for m in modules} - {root}
    return circles(edges, modules), circles(package_edges, packages), example


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="research")
    args = parser.parse_args(argv)
    files, packages, example = report(args.root)
    print(f"file circles: {len(files)}")
    for group in files:
        print("  " + " <-> ".join(group))
    print(f"package circles: {len(packages)}")
    for group in packages:
        closing = [example[(a, b)] for a in group for b in group if (a, b) in example]
        verdict = "allowed by the floors" if frozenset(group) in ALLOWED else "not allowed"
        print(f"  {' <-> '.join(group)} ({verdict}): " + "; ".join(closing))
    unexpected = files + [g for g in packages if frozenset(g) not in ALLOWED]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
