"""Ids in paths: request, job, run, actor and object ids are free text from the audited
service, so a route must take any of them whole.

Routes write such a parameter ``{name:id}``. Starlette's own ``str`` stops at a slash and its
``path`` (``.*``) stops at a line break, so an id holding either matched no route (the server
decodes ``%2F`` and ``%0A`` before routing). Importing this module registers ``id``; the
annotated types below are what the routes import, so the registration always comes first.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator
from starlette.convertors import Convertor, register_url_convertor

from audit_platform.query.filters import no_nul


class _AnyText(Convertor[str]):
    regex = "(?s:.*)"  # any character, line breaks too; length and NUL are checked below

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", _AnyText())


#: A request, job, run or actor id.
Id = Annotated[str, Path(min_length=1, max_length=256), AfterValidator(no_nul)]
#: An object's primary key as text, composite keys joined with ','.
ObjectId = Annotated[
    str,
    Path(max_length=1024, description="Primary key as text; composite keys joined with ','."),
    AfterValidator(no_nul),
]


#: A source and a table in a route's path (``/v1/objects/...``, ``/v1/tables/...``).
SourcePath = Annotated[str, Path(max_length=64, description="Source (service) name.")]
TablePath = Annotated[str, Path(max_length=128, description="'name' or 'schema.name'.")]
