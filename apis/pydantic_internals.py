"""Every write to pydantic's internals, checked against pydantic 2.13 (the pin: >=2.13,<2.14).

pydantic has no public API to change a model class's fields once the class exists: the public
``model_fields`` is the class's own ``__pydantic_fields__`` dict, and ``model_rebuild(force=True)``
rebuilds the validator and JSON schema from it. apis/http/schemas.py's ``StrictRequest`` needs
that to make every optional field take null. tests/unit/test_internals_contract.py fails on another
minor release and checks that a replaced field is validated and shown in the schema.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.fields import FieldInfo

PYDANTIC_VERSION = "2.13"


def replace_fields(cls: type[BaseModel], fields: dict[str, FieldInfo]) -> None:
    """Give ``cls`` these fields in place of its own of the same names, validator and schema rebuilt."""
    cls.__pydantic_fields__.update(fields)
    cls.model_rebuild(force=True)
