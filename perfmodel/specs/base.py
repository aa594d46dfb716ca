"""The base of every spec: strict frozen pydantic models, the bounded number types, SpecError."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class SpecError(ValueError):
    """Bad user input. `str(err)` is the one line shown to the user (exit status 2)."""


PosInt = Annotated[int, Field(gt=0, le=10**9)]
NonNegInt = Annotated[int, Field(ge=0, le=10**9)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)


