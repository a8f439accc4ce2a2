"""Caller authentication for the router: API keys in request metadata, checked per tenant.

An interceptor, so the servicers stay free of it and it costs nothing when auth is off (it is
not installed). It wraps each unary handler: the check needs the tenant, which is in the request
body. Predict-style calls are checked against the request's tenant; RouterAdmin needs an admin
key; health and reflection stay open (probes and tooling must work without a key).
"""
from __future__ import annotations

from typing import Callable, Mapping

import grpc

from modelfleet.errors import ModelfleetError
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


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, records: Callable[[], Mapping[str, ApiKeyRecord]]) -> None:
        self._records = records

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        rule = next((r for prefix, r in _RULES.items() if details.method.startswith(prefix)), None)
        if handler is None or rule is None or handler.unary_unary is None:
            return handler
        token = _token(details.invocation_metadata)
        inner = handler.unary_unary
        records = self._records

        async def checked(request, context: grpc.aio.ServicerContext):
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

        return grpc.unary_unary_rpc_method_handler(checked, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
