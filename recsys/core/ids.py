"""How the shop's ids are published: as JSON integers or as strings, decided once, never by accident.

Ids are TEXT in the shop database. A shop declares their types (``RECSYS_USER_ID_TYPE``,
``RECSYS_PRODUCT_ID_TYPE``: ``int`` or ``str``); left unset, a type is taken from the live version
(so published ids keep one type across versions), else inferred: product ids from the catalogue,
user ids from the window, ``int`` when at least ``INT_SHARE`` of the distinct ids are integers a
browser holds exactly. With type ``int``, an id that is not such an integer makes its row invalid
(reported with examples by the extract), never a reason to turn every id into a string.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

IdType = Literal["int", "str"]
ID_TYPES: tuple[IdType, ...] = ("int", "str")
# canonical decimal integers only: "007" and "-0" would not come back as the shop wrote them
CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,15})$"
_CANONICAL_INT = re.compile(CANONICAL_INT.replace("$", r"\Z"))
JS_SAFE_INT = 2**53  # larger integers lose digits in a browser's JSON numbers
INT_SHARE = 0.99  # inferred int when at least this share of the distinct ids are integers


def integer_ids(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Per id: is it a canonical integer below 2**53 in magnitude (null for a null id)?"""
    return integer_id_values(ids)[0]


def integer_id_values(ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """``integer_ids(ids)``, and the ids' int64 values: each integer id's value (0 or another
    number for the others, null for a null id). The extract reuses the values it parsed for the
    check instead of parsing the ids again.

    When every id parses as an int64 (a shop of integer ids), an id is canonical exactly when it
    has no leading zero ("007", "-0", "0x5": Arrow's parser takes those; "+5" and spaces it
    refuses): a fraction of the regex's time, and half of printing the values back to compare."""
    try:
        values = pc.cast(ids, pa.int64())
    except pa.ArrowInvalid:
        canonical = pc.match_substring_regex(ids, CANONICAL_INT)
        values = pc.cast(pc.if_else(canonical, ids, "0"), pa.int64())
        return pc.and_(canonical, pc.less(pc.abs(values), JS_SAFE_INT)), values
    in_range = pc.and_(pc.less(values, JS_SAFE_INT), pc.greater(values, -JS_SAFE_INT))
    leading_zero = pc.or_(pc.starts_with(ids, "-0"), pc.and_(pc.starts_with(ids, "0"), pc.greater(pc.binary_length(ids), 1)))
    return pc.and_not(in_range, leading_zero), values


def infer(integers: int, total: int) -> IdType:
    return "int" if total and integers >= INT_SHARE * total else "str"


def fits(id_type: IdType, value: str) -> bool:
    """Whether one id can be published as ``id_type`` (``integer_ids`` of one id, without Arrow:
    the API checks every request's ids)."""
    return id_type == "str" or (_CANONICAL_INT.match(value) is not None and abs(int(value)) < JS_SAFE_INT)


def of_version(meta: dict, user_ids: list[str], item_ids: list[str]) -> IdTypes:
    """A published version's id types; a version published before they were recorded had ints
    only where every id was one."""
    if "id_types" in meta:
        return IdTypes.from_dict(meta["id_types"])
    def all_int(values: list[str]) -> IdType:
        return "int" if pc.all(integer_ids(pa.array(values, pa.string()))).as_py() is not False else "str"
    return IdTypes(all_int(user_ids), all_int(item_ids), {"user": "published before id types", "product": "same"})


def id_out(id_type: IdType) -> Callable[[str], int | str]:
    """What an id stored as text becomes in published JSON."""
    return int if id_type == "int" else str


@dataclass(frozen=True)
class IdTypes:
    user: IdType
    product: IdType
    source: dict[str, str]  # per kind: configured | live version | inferred (...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> IdTypes:
        return cls(values["user"], values["product"], values.get("source", {}))
