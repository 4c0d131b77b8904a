"""Reading a space file within bounds: its size (MAX_SPACE_BYTES, refused before parsing) and the values
it expands to (MAX_YAML_NODES: an alias counts each time it is used), so a huge file or an alias bomb is one
error line in milliseconds, not minutes of parsing and gigabytes; and each key of a mapping given once (a
repeated key is named with its lines, not silently replaced)."""
from __future__ import annotations

from pathlib import Path

import yaml

from study.cli import ProjectError

MAX_SPACE_BYTES = 1 << 20        # 1 MiB, refused before parsing
MAX_YAML_NODES = 100_000         # values after alias expansion (each use of an alias counts in full)


class SpaceError(ProjectError, ValueError):
    """A space file that cannot be used; the message names the file, the key and what is allowed."""


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a document that expands past MAX_YAML_NODES values.

    Aliases stay allowed (``*common`` reuses a case), but each use counts as the whole subtree it
    names: the composed node graph is measured (memoised, linear in its distinct nodes) before any
    Python object is constructed, so an alias bomb is refused in milliseconds instead of expanded.
    """

    def construct_mapping(self, node, deep=False):
        """A mapping whose keys are each given once: YAML's loaders keep the last of a repeated key silently,
        so a second ``lr:`` would quietly replace the first. Keys merged in with ``<<: *alias`` may be
        overridden (that is what a merge is for)."""
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:   # an unhashable key: the constructor below names it
                    continue
                if first is not None:
                    raise SpaceError(f"key {key!r} is given twice in the same mapping (lines {first} and {line}); "
                                     f"YAML would keep only the last: remove one")
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node)
        if n > MAX_YAML_NODES:
            how_many = ("an endless number of" if n == float("inf") else f"more than {MAX_YAML_NODES:,}")
            raise SpaceError(f"expands to {how_many} YAML values (an alias counts each time it is used, "
                             f"and one inside the value it names never ends); "
                             f"the limit is {MAX_YAML_NODES:,} (MAX_YAML_NODES in study/space/reading.py): use fewer "
                             f"aliases and values")
        return self.construct_document(node)


def _expanded_size(root) -> float:
    """Values in the document once every alias is expanded (inf for a self-referencing one)."""
    sizes: dict[int, float] = {}
    stack = [(root, False)]
    active: set[int] = set()
    while stack:   # iterative: nesting depth is the file's to choose
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            active.discard(key)
            kids = _children(node)
            sizes[key] = min(1 + sum(sizes[id(k)] for k in kids), float("inf"))
            if sizes[key] > MAX_YAML_NODES:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in active:   # an alias inside the node it names: expands forever
            return float("inf")
        active.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in sizes)
    return sizes[id(root)]


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def read_space_yaml(path: Path):
    """The parsed YAML of the space file at ``path``, read and parsed within bounds."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPACE_BYTES + 1)   # bounded: the file may be huge, or a pipe that never ends
        if len(data) > MAX_SPACE_BYTES:
            raise SpaceError(f"{path}: larger than {MAX_SPACE_BYTES // 1024} KiB (MAX_SPACE_BYTES in "
                             f"study/space/reading.py); a space file holds ranges, not lists of every value: use "
                             f"{{int: [lo, hi]}} or {{uniform: [lo, hi]}} instead of long choice lists")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path}: cannot be read ({e.strerror if isinstance(e, OSError) else e}); "
                         f"give a readable UTF-8 YAML file") from e
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)
    except SpaceError as e:
        raise SpaceError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from e
    except RecursionError:
        raise SpaceError(f"{path}: nested too deeply to parse; a space file is a few levels deep "
                         f"(params -> name -> distribution)") from None
    except (ValueError, OverflowError) as e:   # a scalar YAML cannot turn into Python (a 5,000-digit number)
        raise SpaceError(f"{path}: a value cannot be read ({str(e).split(';')[0]}); "
                         f"give numbers of ordinary size and dates as YYYY-MM-DD") from None
    return raw
