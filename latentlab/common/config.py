"""The base class for every config object in the library.

Configs are pydantic models so that a value coming from params.yaml is checked once, at the
edge, with a message that names the key: unknown keys are refused, types are strict (a string
is never silently turned into a number) and each field carries its own bounds.
"""

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)
