"""Cross-cutting concerns of every RPC: the last-resort error handler."""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger("nextword")


def _already_aborted(context) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


class LastResortInterceptor(grpc.ServerInterceptor):
    """A bug in a handler becomes INTERNAL with an error id, and the traceback goes to the log."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def fail(context, error: Exception):
            if _already_aborted(context) or isinstance(error, grpc.RpcError):
                raise error
            error_id = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", error_id, method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error {error_id}; the server log has the details")

        if handler.unary_unary:
            def unary_unary(request, context):
                try:
                    return handler.unary_unary(request, context)
                except Exception as error:  # noqa: BLE001 - last resort by design
                    fail(context, error)
            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)

        def streaming(inner):
            def run(request, context):
                try:
                    yield from inner(request, context)
                except Exception as error:  # noqa: BLE001 - last resort by design
                    fail(context, error)
            return run

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler
