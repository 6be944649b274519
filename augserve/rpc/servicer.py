"""The Augment servicer: one method per RPC, registered with the generated
`add_AugmentServicer_to_server`. It parses requests, asks the session manager, and turns the
manager's plain events into messages; every exception leaves through `status_of`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

import augserve
from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.core.errors import SpecError
from augserve.core.spec import eval_spec
from augserve.rpc.admission import PendingOpens, peer_host
from augserve.rpc.compression import ChunkEncoder, available_codecs, support_to_proto
from augserve.rpc.convert import RESUME_METADATA_KEY
from augserve.rpc.messages import event_messages, limits_to_proto, session_info
from augserve.rpc.requests import parse_compression, parse_open
from augserve.rpc.schema import describe_ops_response
from augserve.rpc.status import status_of
from augserve.streaming.manager import SessionManager
from augserve.streaming.session import Session

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Augment"].full_name


class AugmentServicer(pb_grpc.AugmentServicer):
    """One method per RPC; all state lives in the SessionManager."""

    def __init__(self, manager: SessionManager, device: str) -> None:
        self.manager = manager
        self.device = device
        self.pending = PendingOpens(manager.limits.max_pending_opens, manager.limits.max_pending_opens_per_peer)

    def Stream(self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        session: Session | None = None
        host = peer_host(context.peer())
        try:
            first = self._first_message(request_iterator, context, host)
            if first is None:
                return
            if isinstance(first, Undecodable):
                raise first.field_error()
            kind = first.WhichOneof("kind")
            if kind != "open":
                raise SpecError(kind or "message", "the first message of a stream must be open")
            request = parse_open(first.open, eval_spec, self.manager.limits.max_decoded_pixels)
            compression = parse_compression(first.open)
            session = self.manager.open(request)
            # Per session, at send time: members of one group share the produced batch and
            # each gets it encoded its own way.
            encoder = ChunkEncoder(compression) if compression.enabled and session.facts.transport == "inband" else None
            context.add_callback(session.cancel)
            threading.Thread(
                target=_read_client, args=(request_iterator, session), name=f"augserve-reader-{session.id}", daemon=True
            ).start()
            yield session_info(session.facts, self.manager.backend.name)
            for event in session.events():
                yield from event_messages(event, request.max_chunk_bytes, encoder)
        except Exception as error:
            code, message = status_of(error)
            if session is None:
                log.info("refused a stream from %s: %s %s", host, code.name, message)
            if session is not None and session.last_token:
                context.set_trailing_metadata(((RESUME_METADATA_KEY, session.last_token),))
            context.abort(code, message)
        finally:
            if session is not None:
                self.manager.close(session)

    def _first_message(
        self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext, host: str
    ) -> pb.ClientMessage | Undecodable | None:
        """The stream's first message, or None when the call is cut first: after
        `open_timeout_seconds`, or to make room for newer streams (`PendingOpens`)."""
        ticket = self.pending.enter(host, context.cancel)
        timer = threading.Timer(self.manager.limits.open_timeout_seconds, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            return next(request_iterator, None)
        except grpc.RpcError:
            log.info("cut a stream from %s before its open message", host)
            return None
        finally:
            timer.cancel()
            self.pending.leave(ticket)

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.field_error()))
        response = pb.ListDatasetsResponse()
        for name, dataset in sorted(self.manager.datasets.items()):
            manifest = dataset.manifest
            response.datasets.add(
                name=name,
                samples=len(manifest),
                classes=list(manifest.classes),
                train_samples=len(dataset.split_ids("train")),
                validation_samples=len(dataset.split_ids("validation")),
                image_size=list(manifest.uniform_size() or ()),
            )
        return response

    def GetServerInfo(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.field_error()))
        manager = self.manager
        snapshot = manager.snapshot()
        return pb.ServerInfo(
            version=augserve.__version__,
            backend=manager.backend.name,
            device=self.device,
            limits=limits_to_proto(manager.limits),
            live_sessions=len(snapshot.sessions),
            producers=len(snapshot.producers),
            batches_produced=snapshot.counters.batches_produced,
            batches_delivered=snapshot.counters.batches_delivered,
            datasets=sorted(manager.datasets),
            buffer_bytes=snapshot.buffer_bytes,
            compressions=[support_to_proto(codec) for codec in available_codecs()],
        )

    def DescribeOps(self, request: pb.DescribeOpsRequest, context: grpc.ServicerContext) -> pb.DescribeOpsResponse:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.field_error()))
        return describe_ops_response()


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the message its method takes."""

    message_type: str
    error: str

    def field_error(self) -> SpecError:
        return SpecError("message", f"could not be parsed as {self.message_type} ({self.error})")


def _tolerant(deserialize: Callable[[bytes], object], message_type: str) -> Callable[[bytes], object]:
    """A deserializer that hands undecodable bytes to the servicer (which names the problem with
    INVALID_ARGUMENT) instead of failing inside grpc (INTERNAL)."""

    def tolerant(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as error:
            return Undecodable(message_type, str(error))

    return tolerant


REQUEST_TYPES = {
    f"/{SERVICE_NAME}/{method.name}": method.input_type.full_name
    for method in pb.DESCRIPTOR.services_by_name["Augment"].methods
}


class TolerantDecoding(grpc.ServerInterceptor):
    """Wraps the request deserializers of the Augment methods (as the generated registration
    made them) with `_tolerant`."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        message_type = REQUEST_TYPES.get(details.method)
        if handler is None or message_type is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer, message_type))


def _read_client(request_iterator: Iterator[pb.ClientMessage], session: Session) -> None:
    """Apply credits, slot releases and pauses as they arrive; a protocol error ends the session."""
    try:
        for message in request_iterator:
            if isinstance(message, Undecodable):
                session.fail(message.field_error())
                return
            kind = message.WhichOneof("kind")
            if kind == "credit":
                session.grant(message.credit.batches)
            elif kind == "release":
                session.release_slot(message.release.sequence)
            elif kind == "pause":
                session.pause(message.pause.seconds)
            elif kind == "resume":
                session.resume()
            elif kind == "open":
                session.fail(SpecError("open", "the session is already open; a stream opens one session"))
                return
            else:
                session.fail(SpecError("message", "empty ClientMessage (expected credit, release, pause or resume)"))
                return
    except grpc.RpcError:
        session.cancel()  # the client went away
    except SpecError as error:
        session.fail(error)
    except Exception as error:  # malformed input must not kill the server
        log.warning("session %s: reader stopped: %s", session.id, error)
        session.cancel()
