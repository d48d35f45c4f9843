"""Load each dataset once per process while a run starts, and read COCO categories cheaply.

* **One parse per start** (:func:`parse_each_dataset_once`): a run's start asks detectron2's
  ``DatasetCatalog`` for the training set several times -- the input checks, the training loader
  and the mixing mapper's partner pool -- and each call parses the json again (for COCO's train
  json, tens of seconds and gigabytes per call, per rank). Inside the block, each registered
  function runs once and later calls get the same dicts (a new list each time, so a caller that
  filters or extends its list does not change another's). Outside it nothing is kept: the
  training loader serializes what it needs, and the parsed dicts can be freed.
* **Categories without a full parse** (:func:`read_coco_categories`): the class names of a COCO
  json are known at registration, before its images are loaded; decoding only its
  ``"categories"`` array costs a read of the file, not a parse of every annotation.
"""

import contextlib
import json
import logging
import os

from detectron2.data import DatasetCatalog

logger = logging.getLogger(__name__)

__all__ = [
    "decode_array_after",
    "file_key",
    "parse_each_dataset_once",
    "read_coco_categories",
    "read_json_text",
]


@contextlib.contextmanager
def parse_each_dataset_once():
    """Within the block, ``DatasetCatalog.get(name)`` calls each registered function only once.

    Memoized per ``(name, function)``: a dataset re-registered inside the block (e.g. without its
    unreadable images) is loaded again. The memo is an attribute of detectron2's catalog object
    for the duration of the block, so detectron2's own callers (``get_detection_dataset_dicts``)
    use it too; nesting is allowed (the outer block's memo is kept).
    """
    if "get" in vars(DatasetCatalog):  # already inside a block
        yield
        return
    memo = {}
    original = type(DatasetCatalog).get

    def get(name):
        func = DatasetCatalog[name] if name in DatasetCatalog else None
        key = (name, id(func))
        if func is None or key not in memo:
            memo[key] = (func, original(DatasetCatalog, name))
        return list(memo[key][1])

    DatasetCatalog.get = get
    try:
        yield
    finally:
        del DatasetCatalog.get
        memo.clear()


def decode_array_after(text, key, accept):
    """The first JSON array that follows ``"key":`` in ``text`` and satisfies ``accept``.

    Decodes that array only: every occurrence of the key is tried (a string elsewhere could
    contain it). Returns None when no occurrence is followed by an accepted array.
    """
    quoted = f'"{key}"'
    at = text.find(quoted)
    while at >= 0:
        value = _decode_array(text, at + len(quoted))
        if value is not None and accept(value):
            return value
        at = text.find(quoted, at + 1)
    return None


def read_json_text(json_file):
    """The text of a JSON file, which must be UTF-8 (JSON's encoding; pycocotools reads it so).

    Raises:
        ValueError: not UTF-8 (Latin-1, UTF-16 ...), or UTF-8 with a byte-order mark (which
            pycocotools' ``json.load`` refuses); the message names the file and the fix.
    """
    with open(json_file, "rb") as f:
        raw = f.read()
    fix = (
        're-save it as UTF-8, e.g. python -c "import json,sys; d=json.load(open(sys.argv[1], '
        "encoding='latin-1')); json.dump(d, open(sys.argv[2], 'w', encoding='utf-8'))\" in.json "
        "out.json (use the file's real encoding, e.g. utf-16, in place of latin-1)"
    )
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError(
            f"'{json_file}' starts with a UTF-8 byte-order mark, which pycocotools (detectron2's "
            f"COCO reader) refuses. JSON files must be plain UTF-8: {fix}."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"'{json_file}' is not UTF-8 ({e}). JSON files must be UTF-8: {fix}."
        ) from None


def _decode_array(text, start):
    """The JSON array that follows the key ending at ``start``, else None."""
    decoder = json.JSONDecoder()
    pos = start
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    if pos >= len(text) or text[pos] != ":":
        return None
    pos += 1
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    if pos >= len(text) or text[pos] != "[":
        return None
    try:
        value, _ = decoder.raw_decode(text, pos)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _is_category_list(value):
    return all(isinstance(c, dict) and "id" in c for c in value)


def read_coco_categories(json_file):
    """The ``"categories"`` list of a COCO json, decoding that array only.

    Every occurrence of the key ``"categories"`` is tried (a string elsewhere could contain the
    word), and the first that is followed by a list of objects with an ``id`` wins; if none is,
    the whole file is parsed. The file must be UTF-8 (:func:`read_json_text`).

    Raises:
        ValueError: the file is not UTF-8, or not JSON; the message names the file.
    """
    text = read_json_text(json_file)
    cats = decode_array_after(text, "categories", _is_category_list)
    if cats is not None:
        return cats
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"'{json_file}' is not valid JSON: {e}") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    return cats or []


def file_key(path):
    """``(absolute path, mtime)``: identifies a file's content for a per-process cache."""
    return os.path.abspath(path), os.path.getmtime(path)
