"""FastAPI dependencies, as ``Annotated`` aliases the routes declare their parameters with."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import pydantic_core
from fastapi import Depends, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError

from nextbest.customer_columns import columns_of_objects
from serving.schemas import (
    BATCH_ROW_LOCATIONS,
    BatchDecisionRequest,
    ErrorResponse,
    ValidationErrorResponse,
)
from serving.security import API_KEY_HEADER, AuthError, Principal, Scope
from serving.service import ScoringService, oversized_batch

ModelT = TypeVar("ModelT", bound=BaseModel)
BatchT = TypeVar("BatchT", bound=BatchDecisionRequest)

log = logging.getLogger(__name__)

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="An API key (`python -m serving.security create`), with the route's scope.",
)


async def get_service(request: Request) -> ScoringService:
    """The service the lifespan built (catalogue, rules, model, journal, contact store)."""
    return request.app.state.service


ServiceDep = Annotated[ScoringService, Depends(get_service)]


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency checking the caller's API key carries ``scope`` (401/403 otherwise).

    Dependencies are ``async``: FastAPI runs plain functions in a thread pool, a thread hop
    per dependency per request (the check itself takes a microsecond)."""

    async def check(
        service: ServiceDep,
        key: Annotated[str | None, Security(_api_key_header)],
    ) -> Principal:
        return authorize_key(service, key, scope)

    check.__name__ = f"require_{scope}"
    return check


def authorize_key(service: ScoringService, key: str | None, scope: Scope) -> Principal:
    """The caller of API key ``key``, if it carries ``scope``.

    Raises
    ------
    fastapi.HTTPException
        401 (with ``WWW-Authenticate``) for a missing or unknown key, 403 for a key without
        ``scope``.
    """
    try:
        return service.api_keys.authenticate(key, scope)
    except AuthError as exc:
        headers = {"WWW-Authenticate": "ApiKey"} if exc.status_code == 401 else None
        raise HTTPException(exc.status_code, exc.detail, headers=headers) from None


def authorize(request: Request, scope: Scope) -> ScoringService:
    """The service, once the request's API key is checked for ``scope`` (401/403 otherwise):
    :func:`require` without FastAPI's dependency resolution, for the decision routes, where
    resolving two dependencies cost more than a tenth of a request. Such routes declare the
    key in the schema with :func:`api_key_security`."""
    service: ScoringService = request.app.state.service
    authorize_key(service, request.headers.get(API_KEY_HEADER), scope)
    return service


def api_key_security() -> dict[str, Any]:
    """``openapi_extra`` declaring that a route takes the API key header (for routes that
    check it with :func:`authorize`)."""
    return {"security": [{_api_key_header.scheme_name: []}]}


def error_responses(
    scope: Scope, own: Mapping[int, str] | None = None, body: bool = True
) -> dict[int | str, dict[str, Any]]:
    """A route's documented errors (its ``responses``): 401 and 403 for an API key checked
    for ``scope``, with ``body`` 413 and 422 for a JSON body, and ``own``, the route's own
    statuses with their descriptions (``{404: "No decision with this id."}``)."""
    errors: dict[int, str] = {
        **(own or {}),
        401: "Missing or unknown API key.",
        403: f"The API key lacks the `{scope}` scope.",
    }
    if body:
        errors.setdefault(413, "Body too large.")
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": text}
        for status, text in sorted(errors.items())
    }
    if body:
        out[422] = {
            "model": ValidationErrorResponse,
            "description": "Schema violations, fields named.",
        }
    return out


DecideKey = Annotated[Principal, Depends(require("decide"))]
RewardKey = Annotated[Principal, Depends(require("reward"))]
ConsentKey = Annotated[Principal, Depends(require("consent"))]
MetricsKey = Annotated[Principal, Depends(require("metrics"))]
AdminKey = Annotated[Principal, Depends(require("admin"))]


def parse_body(model: type[ModelT], body: bytes, context: dict[str, Any] | None = None) -> ModelT:
    """Validate a raw JSON body as ``model`` in one pass (JSON parsing included, in
    pydantic-core), with ``context`` (the catalogue, so names are checked in the same pass).

    Raises
    ------
    fastapi.exceptions.RequestValidationError
        HTTP 422, one entry per violation, located under ``body``.
    fastapi.HTTPException
        HTTP 413: a batch over the cap of :func:`serving.schemas.batch_request_model`
        (whatever else is wrong with it)."""
    try:
        return model.model_validate_json(body, context=context)
    except ValidationError as exc:
        for e in exc.errors(include_url=False, include_input=False):
            if e["type"] == "too_long" and e["loc"] in BATCH_ROW_LOCATIONS:
                ctx = e.get("ctx", {})
                raise oversized_batch(ctx["actual_length"], ctx["max_length"]) from None
        errors = [
            {"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None  # the handler names the first few


def parse_batch(model: type[BatchT], body: bytes, context: dict[str, Any] | None) -> BatchT:
    """:func:`parse_body` for a batch request (``model``: the service's
    :func:`~serving.schemas.batch_request_model`), with its customer objects validated as
    columns (:func:`~nextbest.customer_columns.columns_of_objects`): a 10,000-customer body
    of objects goes from bytes to contexts in about half the time.

    The columns are validated as the objects would be (the same types and rules), so the
    same requests are accepted and decided alike. A request the columns refuse, or whose
    objects are not plainly shaped, is validated again as objects, so that its errors are
    located in the objects (``customers.17.age``): a refused batch of objects costs both
    validations. Should the objects pass where the columns did not, the request is served
    as objects and the disagreement logged (the two validations are meant to agree).

    Raises
    ------
    fastapi.exceptions.RequestValidationError
        HTTP 422, as :func:`parse_body`.
    fastapi.HTTPException
        HTTP 413: more customers than ``model.max_rows`` (once the body is parsed, before
        anything is validated).
    """
    data = _objects_as_columns(model, body)
    if data is None:
        return parse_body(model, body, context)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        request = parse_body(model, body, context)  # the objects' own errors, as a rule
        refused = [(e["type"], e["loc"][:2]) for e in exc.errors(include_input=False)[:3]]
        log.warning(
            "a batch of customer objects was refused as columns %s but accepted as objects: "
            "the two validations disagree (served as objects)",
            refused,
        )
        return request


_COLUMNS_KEY = re.compile(rb'"columns"\s*:')
"""A ``columns`` key (or a text like it inside a value: then the objects are validated as
such). Found in microseconds in a columns body, whose big value follows the key; a scan of a
10,000-customer body of objects takes ~4 ms."""


def _objects_as_columns(model: type[BatchT], body: bytes) -> dict[str, Any] | None:
    """The request data of ``body`` with its ``customers`` as ``columns``, to validate as
    ``model``; None when that does not apply (no customer objects, or one not plainly shaped).

    Raises
    ------
    fastapi.HTTPException
        HTTP 413: more customers than ``model.max_rows``.
    """
    if _COLUMNS_KEY.search(body):  # the columns form, validated straight from the JSON
        return None
    try:
        data = pydantic_core.from_json(body)
    except ValueError:
        return None
    if type(data) is not dict or "columns" in data:  # a key the search missed: \u-escaped
        return None
    customers = data.get("customers")
    if type(customers) is not list:
        return None
    if model.max_rows is not None and len(customers) > model.max_rows:
        raise oversized_batch(len(customers), model.max_rows)
    columns = columns_of_objects(customers)
    if columns is None:
        return None
    data["columns"] = columns
    del data["customers"]
    return data


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a route's JSON body as ``model`` (for routes that read
    the raw body and validate it with :func:`parse_body`); :func:`serving.app.create_app`
    adds the model to the schema's components."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
