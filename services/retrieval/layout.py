"""How a catalogue's collection is laid out: recorded in the collection, read back on open.

Settings choose the layout of catalogues created from now on; a catalogue keeps the layout it
was created with. So a new configuration (another code, another index) can be tried in a new
catalogue beside the old ones, and an upgrade of Loupe never re-reads old rows the new way.
The layout is JSON in the collection's description (every Milvus has one); collections made
before it was recorded are recognised by their schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from services.retrieval import codes

# Where full-precision vectors live (vector_store.py).
SIDECAR = "sidecar"
ROW_FIELDS = "fields"
LAYOUT_VERSION = 2
_KEY = "loupe"


@dataclass(frozen=True)
class CatalogLayout:
    # codes.SIMHASH_V1, codes.SIMHASH_V2 or codes.FLOAT: what the ANN field holds.
    code: str
    dim: int
    # SIDECAR or ROW_FIELDS.
    vectors: str
    # Stored vectors: "int8" (a scale and int8 values) or "float32" (before layout 2).
    encoding: str = "int8"
    # Collections made before layout 2 have no source_uri field.
    source_uri: bool = True
    # The Milvus rows hold only what a search needs (the code, and what filters read: item
    # id, object index, metadata); the sidecar holds every field (SIDECAR catalogues).
    slim: bool = False

    @property
    def binary(self) -> bool:
        return self.code in codes.BINARY_CODES

    @property
    def metric(self) -> str:
        return "HAMMING" if self.binary else "IP"

    @property
    def code_bytes(self) -> int:
        return codes.code_bits(self.dim) // 8 if self.binary else 4 * self.dim

    @property
    def stored_vector_bytes(self) -> int:
        return 4 + self.dim if self.encoding == "int8" else 4 * self.dim

    def description(self) -> str:
        return json.dumps({_KEY: {"layout": LAYOUT_VERSION, **asdict(self)}}, sort_keys=True)

    @classmethod
    def from_description(cls, text: str) -> CatalogLayout | None:
        """The layout recorded by `description`, or None when there is none."""
        try:
            recorded: Any = json.loads(text)[_KEY]
            return cls(
                code=str(recorded["code"]),
                dim=int(recorded["dim"]),
                vectors=str(recorded["vectors"]),
                encoding=str(recorded.get("encoding", "int8")),
                source_uri=bool(recorded.get("source_uri", True)),
                slim=bool(recorded.get("slim", False)),
            )
        except (ValueError, TypeError, KeyError):
            return None


def legacy_layout(binary: bool, dim: int) -> CatalogLayout:
    """A collection made before layouts were recorded: simhash-v1 or float codes, float32
    vectors as base64 text in fields of the rows, no source_uri."""
    return CatalogLayout(
        code=codes.SIMHASH_V1 if binary else codes.FLOAT,
        dim=dim,
        vectors=ROW_FIELDS,
        encoding="float32",
        source_uri=False,
    )
