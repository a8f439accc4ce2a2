"""Caller authentication for the router: API keys in request metadata, checked per tenant.

A wrapper registered around each servicer (modelfleet.servicer_wrap), so the servicers stay
free of it and it costs nothing when auth is off (it is not installed). It needs the tenant,
which is in the request body. Predict-style calls are checked against the request's tenant;
RouterAdmin needs an admin key; health and reflection stay open (probes and tooling must work
without a key).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from modelfleet.errors import ModelfleetError
from modelfleet.servicer_wrap import UnaryMethod, unary_methods, wrap_methods
from version_service.api_keys import authorize
from version_service.schema import ApiKeyRecord

API_KEY_HEADER = "x-api-key"
_ADMIN = "admin"
_ANY_KEY = "any"

# method prefix -> how to find the tenant in the request (or the kind of check)
_RULES: dict[str, object] = {
    "/modelfleet.v1.Predictor/": lambda request: request.tenant_id,
    "/modelfleet.v1.RouterAdmin/": _ADMIN,
    "/inference.GRPCInferenceService/Model": lambda request: (getattr(request, "model_name", "")
                                                             or getattr(request, "name", "")),
    "/inference.GRPCInferenceService/": _ANY_KEY,
}


def _token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if text.lower().startswith("bearer "):
                return text[7:].strip()
    return None


class ApiKeyCheck:
    def __init__(self, records: Callable[[], Mapping[str, ApiKeyRecord]]) -> None:
        self._records = records

    def checked(self, servicer: Any, service: ServiceDescriptor) -> Any:
        """What to register in place of `servicer`: every unary method of `service` that a rule
        covers refuses a call without a fitting key."""
        rules = {}
        for method in unary_methods(service):
            path = f"/{service.full_name}/{method}"
            rule = next((r for prefix, r in _RULES.items() if path.startswith(prefix)), None)
            if rule is not None:
                rules[method] = rule
        return wrap_methods(servicer, rules, lambda method, inner: self._check(rules[method], inner))

    def _check(self, rule: object, inner: UnaryMethod) -> UnaryMethod:
        records = self._records

        async def checked(request, context: grpc.aio.ServicerContext):
            token = _token(context.invocation_metadata())
            try:
                if rule == _ADMIN:
                    authorize(token, records(), None)
                elif rule == _ANY_KEY:
                    authorize(token, records(), "*")  # any valid key; "*" is never a tenant id
                else:
                    authorize(token, records(), rule(request))
            except ModelfleetError as exc:
                if rule == _ANY_KEY and exc.code == grpc.StatusCode.PERMISSION_DENIED:
                    return await inner(request, context)  # server-level calls: any valid key will do
                await context.abort(exc.code, str(exc))
            return await inner(request, context)

        return checked
