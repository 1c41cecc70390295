"""Reading the body of `POST /v1/assess`: JSON (`AssessRequest`) or a multipart/form-data
upload (`AssessUpload`), into one `Item`.

FastAPI cannot declare two body types on one route, so this route reads its body itself; the
OpenAPI document still describes both (`REQUEST_BODY`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..aggregate import DEFAULT_MAX_POST_IMAGES
from ..types import MODES
from .errors import ApiError, validation_message
from .models import AssessRequest, AssessUpload, ModeName, check_depth


def _form_schema() -> dict[str, Any]:
    """AssessUpload's schema without `null` (a form field is absent, never null), metadata as
    the JSON object its part holds."""
    schema = AssessUpload.model_json_schema()
    for prop in schema["properties"].values():
        options = prop.pop("anyOf", None)
        if options is not None:
            prop.update(next(o for o in options if o.get("type") != "null"))
        prop.pop("default", None)
    schema["properties"]["metadata"] = {
        "type": "object",
        "description": "Request metadata: a JSON object (the part's text).",
    }
    return schema


REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/AssessRequest"}},
        "multipart/form-data": {
            "schema": _form_schema(),
            "encoding": {"metadata": {"contentType": "application/json"}},
        },
    },
}
_FORM_FIELDS = ("image", "policy", "mode", "metadata", "shadow")


@dataclass
class Item:
    """One image, video or post (a list) to judge, from either body type."""

    image: str | bytes | list[str] | list[str | bytes]
    policy: str | None = None
    mode: ModeName | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    shadow: str | None = None

    @classmethod
    def of(cls, request: AssessRequest) -> Item:
        return cls(request.image, request.policy, request.mode, request.metadata, request.shadow)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A body up to this size is parsed on the event loop: json.loads takes microseconds for it, far
# less than the hop to a worker thread and back (the lean request path: docs/serve.md).
# Larger bodies (a big image in a data URL) are parsed in a thread, not to stall other requests.
INLINE_JSON_BYTES = 64 * 1024


def parse_json(raw: bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused like any other invalid text."""
    return json.loads(raw, parse_constant=_no_constants)


async def read_item(request: Request, max_part_size: int) -> Item:
    """The body of POST /v1/assess as an Item; ApiError 400/415/422 when it is not one."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        raw = await request.body()
        try:
            if len(raw) <= INLINE_JSON_BYTES:
                data = parse_json(raw)
            else:
                data = await asyncio.to_thread(parse_json, raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
        try:
            return Item.of(AssessRequest.model_validate(data))
        except ValidationError as err:
            message, param = validation_message(err.errors())
            raise ApiError(422, "invalid_request", message, param=param) from None
    if media == "multipart/form-data":
        return await _read_form(request, max_part_size)
    raise ApiError(
        415,
        "unsupported_media_type",
        "send the image as application/json (a data URL) or as multipart/form-data (a file)",
    )


async def _read_form(request: Request, max_part_size: int) -> Item:
    try:
        form = await request.form(
            max_files=DEFAULT_MAX_POST_IMAGES + 3, max_fields=8, max_part_size=max_part_size
        )
    except HTTPException:
        raise
    except Exception:  # python-multipart's parser errors
        raise ApiError(400, "invalid_form", "the multipart body cannot be parsed") from None
    try:
        unknown = sorted(set(form.keys()) - set(_FORM_FIELDS))
        if unknown:
            raise ApiError(
                422,
                "invalid_request",
                f"unknown form field {unknown[0]!r}; fields: {', '.join(_FORM_FIELDS)}",
                param=unknown[0],
            )
        values = {key: form.getlist(key) for key in _FORM_FIELDS}
        for key, found in values.items():
            if len(found) > 1 and key != "image":  # several images: one post
                raise ApiError(422, "invalid_request", f"{key}: given twice", param=key)
        if not values["image"]:
            raise ApiError(422, "invalid_request", "image: a file is required", param="image")
        if len(values["image"]) > DEFAULT_MAX_POST_IMAGES:
            raise ApiError(
                422,
                "invalid_request",
                f"image: at most {DEFAULT_MAX_POST_IMAGES} images in one post",
                param="image",
            )
        images = [await _image(image) for image in values["image"]]
        return Item(
            image=images[0] if len(images) == 1 else images,
            policy=await _text(values["policy"], "policy"),
            mode=_mode(await _text(values["mode"], "mode")),
            metadata=_metadata(await _text(values["metadata"], "metadata")),
            shadow=await _text(values["shadow"], "shadow"),
        )
    finally:
        await form.close()


async def _image(image: UploadFile | str) -> str | bytes:
    if isinstance(image, UploadFile):
        return await image.read()
    if image[:5].lower() == "data:":
        return image  # a data URL sent as a text field
    # a string would otherwise be read as a path on the server
    raise ApiError(422, "invalid_request", "image: must be a file or a data URL", param="image")


async def _text(found: list[UploadFile | str], key: str) -> str | None:
    """A field's text; a part sent as a file (e.g. metadata as application/json) is read.
    An absent field is None; an empty one stays "" and is refused like the JSON body refuses
    it (a templated `-F policy=$P` with $P unset must not fall back to the default policy)."""
    if not found:
        return None
    value = found[0]
    if isinstance(value, UploadFile):
        try:
            value = (await value.read()).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                422, "invalid_request", f"{key}: must be UTF-8 text", param=key
            ) from None
    return value


def _mode(value: str | None) -> ModeName | None:
    if value is None:
        return None
    if value not in MODES:
        raise ApiError(
            422, "invalid_request", f"mode: must be one of {', '.join(MODES)}", param="mode"
        )
    return value


def _metadata(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = parse_json(text.encode())
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        check_depth(value)
    except (ValueError, RecursionError) as err:
        reason = str(err) if not isinstance(err, json.JSONDecodeError) else "not valid JSON"
        raise ApiError(422, "invalid_request", f"metadata: {reason}", param="metadata") from None
    return value
