"""Request and response pieces shared by several routes (pydantic-first, as FastAPI documents them)."""

from __future__ import annotations

import unicodedata
from copy import copy
from typing import Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from apis.core.encodings import InterpolationMode, OutputDType, PaddingMode, ResponseFormat, TensorFormat
from apis.http.inputs import ImageInput
from apis.pydantic_internals import replace_fields


class _DefaultOnNull:
    """After-validator of an optional field: JSON null becomes the field's default."""

    def __init__(self, field: FieldInfo):
        self.field = field

    def __call__(self, value: Any) -> Any:
        return self.field.get_default(call_default_factory=True) if value is None else value


class StrictRequest(BaseModel):
    """Unknown fields, wrong JSON types and NaN/inf are refused (422) instead of silently coerced.

    Every optional field also takes JSON null, meaning "use the default": the seed's clients
    send every parameter, null for those the caller left unset. Fields named in
    ``null_is_a_value`` keep null as a value of its own (``load_size``: no resize). Each such
    field's type becomes ``T | None`` with a validator that swaps null for the default, so JSON
    parsing stays strict and the OpenAPI schema shows that null is accepted.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    null_is_a_value: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.__pydantic_complete__:
            raise TypeError(f"{cls.__name__}: request models must not have unresolved type references")
        nullable: dict[str, FieldInfo] = {}
        for name, field in cls.model_fields.items():
            if field.is_required() or field.default is None or name in cls.null_is_a_value:
                continue
            if any(isinstance(getattr(m, "func", None), _DefaultOnNull) for m in field.metadata):
                continue  # inherited, already nullable
            nullable[name] = copy(field)
            nullable[name].annotation = field.annotation | None
            nullable[name].metadata = [*field.metadata, AfterValidator(_DefaultOnNull(field))]
        if nullable:
            replace_fields(cls, nullable)


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, control characters and invisible format
    characters (zero-width space and joiners, byte-order mark). Every text field refuses it (422)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


class DenseOptions(StrictRequest, ImageInput):
    """What every dense-feature route takes (seed 004): resizing, PCA, upsampling, layout."""

    null_is_a_value = frozenset({"load_size"})

    load_size: int | None = Field(
        ...,
        description=">0: shorter side resized to this; <0: shorter side times |load_size|; null: no resize.",
    )
    ret_patches: bool = Field(
        True, description="true: one vector per patch; false: upsampled to image pixels."
    )
    ret_pca: bool = Field(False, description="Return the top-3 PCA projection scaled to [0, 1].")
    pca_niter: int = Field(5, ge=1, le=100)
    pca_q_min: float = Field(0.01, ge=0.0, le=1.0)
    pca_q_max: float = Field(0.99, ge=0.0, le=1.0)
    interpolation_mode: InterpolationMode = "bilinear"
    tensor_format: TensorFormat = "HWC"
    padding_mode: PaddingMode = "constant"
    output_dtype: OutputDType = Field(
        "float32", description="Dtype of the returned values (float16 halves bytes)."
    )
    response_format: ResponseFormat = Field(
        "json",
        description="json: the tensor as base64 in a JSON body; npy: the response body IS the .npy "
        "file (application/x-npy; model and is_pca in X-Visionserve-* headers), a quarter smaller.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.load_size == 0:
            raise ValueError("load_size must not be 0 (use null for no resize)")
        if self.load_size is not None and self.load_size < -8:
            raise ValueError("load_size below -8 would upscale the image more than 8x")
        if self.pca_q_min >= self.pca_q_max:
            raise ValueError("pca_q_min must be smaller than pca_q_max")
        return self


class DenseResponse(BaseModel):
    features: str = Field(..., description="base64 of little-endian values in `dtype`, C order.")
    shape: list[int]
    dtype: OutputDType
    is_pca: bool
    model: str
