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

__all__ = ["file_key", "parse_each_dataset_once", "read_coco_categories"]


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


def _decode_categories(text, start):
    """The JSON array that follows the key ending at ``start``, if it is a list of categories."""
    decoder = json.JSONDecoder()
    pos = start
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    if pos >= len(text) or text[pos] != ":":
        return None
    pos += 1
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    try:
        value, _ = decoder.raw_decode(text, pos)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(c, dict) and "id" in c for c in value):
        return value
    return None


def read_coco_categories(json_file):
    """The ``"categories"`` list of a COCO json, decoding that array only.

    Every occurrence of the key ``"categories"`` is tried (a string elsewhere could contain the
    word), and the first that is followed by a list of objects with an ``id`` wins; if none is,
    the whole file is parsed. The file must be UTF-8 (JSON's encoding; detectron2's loader needs
    it too).

    Raises:
        ValueError: the file is not UTF-8, or not JSON; the message names the file.
    """
    with open(json_file, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"'{json_file}' is not UTF-8 ({e}). JSON files must be UTF-8: re-save it as UTF-8, "
            "e.g. python -c \"import json,sys; d=json.load(open(sys.argv[1], encoding='latin-1'));"
            " json.dump(d, open(sys.argv[2], 'w', encoding='utf-8'))\" in.json out.json"
        ) from None
    key = '"categories"'
    at = text.find(key)
    while at >= 0:
        cats = _decode_categories(text, at + len(key))
        if cats is not None:
            return cats
        at = text.find(key, at + 1)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"'{json_file}' is not valid JSON: {e}") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    return cats or []


def file_key(path):
    """``(absolute path, mtime)``: identifies a file's content for a per-process cache."""
    return os.path.abspath(path), os.path.getmtime(path)
