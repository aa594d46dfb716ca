"""Safe YAML loading: refuses alias bombs and absurd nesting instead of expanding them.

A hand-written or hostile YAML file must never make moeperf allocate gigabytes or recurse
until the interpreter dies, so the composed node tree is bounded before it is constructed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 200_000  # after alias expansion; the largest real study has a few thousand
MAX_DEPTH = 64
MAX_FILE_BYTES = 8 * 1024 * 1024


class YamlError(ValueError):
    """A YAML document that cannot be read; the message is one line for the user."""


def _check_tree(root: yaml.Node, where: str) -> None:
    # Walk the composed graph counting every visit (aliases re-visit shared nodes, which
    # is exactly the expansion a constructor would do).
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise YamlError(f"{where}: YAML expands to more than {MAX_NODES} nodes (alias bomb?); refused")
        if depth > MAX_DEPTH:
            raise YamlError(f"{where}: YAML nesting deeper than {MAX_DEPTH} levels; refused")
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1) for v in node.value)


def loads(text: str, where: str = "<string>") -> Any:
    """Parse one YAML document with the safe loader, bounded in size and depth."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlError(f"{where}: file larger than {MAX_FILE_BYTES // 2**20} MiB; refused")
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_tree(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except YamlError:
        raise
    except RecursionError as exc:
        raise YamlError(f"{where}: YAML nesting too deep; refused") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlError(f"{where}: not valid YAML{pos}: {problem}") from exc


def load_file(path: str | Path) -> Any:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise YamlError(f"{p}: file larger than {MAX_FILE_BYTES // 2**20} MiB; refused")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise YamlError(f"{p}: no such file") from exc
    except IsADirectoryError as exc:
        raise YamlError(f"{p}: is a directory, expected a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise YamlError(f"{p}: not a UTF-8 text file") from exc
    except OSError as exc:
        raise YamlError(f"{p}: cannot read ({exc.strerror})") from exc
    return loads(text, str(p))
