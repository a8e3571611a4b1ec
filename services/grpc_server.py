"""The gRPC transport: thin servicers over the dataplane, health and reflection.

Each servicer method converts the request, calls the :class:`~deepserve.dataplane.DataPlane`
and converts the answer back. Errors go through :func:`deepserve.errors.to_status`, the
one table from errors to status codes; no stack trace reaches a client. Request bytes that
are not the method's message never reach a servicer: :mod:`deepserve.wire` answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc

from deepserve import codec, lifecycle, metrics, triton
from deepserve.client import NODE_METADATA_KEY
from deepserve.dataplane import PLATFORM, DataPlane
from deepserve.errors import InvalidInput, ModelNotFound, Overloaded, to_status
from deepserve.images import encode_png
from deepserve.runtime import GenerationResult, GenerativeRuntime, RecommenderRuntime
from deepserve.security import ServerSecurity
from deepserve.wire import TolerantRegistry
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc

log = logging.getLogger(__name__)

# The batching figures a model's replica report carries into ListModels.
BATCHING_FIELDS = ("batch_runs", "batched_requests", "largest_batch", "in_flight", "threaded")


def _handled(model_field: str | None = None, default_model: str = "", inference: bool = False):
    """Decorate an RPC (a coroutine, or an async generator for server streaming): errors
    become status codes (INTERNAL ones are logged), and every call is counted and timed by
    model, method and code.

    Args:
        model_field: the request field naming the model (None for server-level RPCs).
        default_model: the model an empty field means.
        inference: an inference call: it also counts in the model's statistics
            (``ModelStatistics``: success or fail, and how long it took).
    """

    def decorate(method):
        rpc = method.__name__

        async def fail(self, context, exc: Exception, status: grpc.StatusCode, message: str) -> None:
            if status == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", rpc)
            if isinstance(exc, Overloaded):  # when to retry, in the trailer gRPC retry policies obey
                context.set_trailing_metadata(
                    (*self.trailing, ("grpc-retry-pushback-ms", str(int(exc.retry_after_s * 1000)))))
            await context.abort(status, message)

        def record(self, request, code: str, started: float) -> None:
            name = (getattr(request, model_field) or default_model) if model_field else None
            model, version = self.dataplane.labels(name)
            seconds = time.perf_counter() - started
            self.metrics.request(model, version, rpc, code, seconds)
            if inference:
                self.dataplane.answered(model, version, code == "OK", seconds)

        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def stream_wrapper(self, request, context):
                started, code = time.perf_counter(), "OK"
                context.set_trailing_metadata(self.trailing)  # errors keep it too
                try:
                    if inference:  # before any decoding: refuse at once while the loop is late
                        self.dataplane.admission.check_loop()
                        lifecycle.call_metadata.set(context.invocation_metadata)  # read for a canary's key
                    async for message in method(self, request, context):
                        yield message
                except asyncio.CancelledError:  # the client cancelled or went away
                    code = "CANCELLED"
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                    status, message = to_status(exc)
                    code = status.name
                    await fail(self, context, exc, status, message)
                finally:
                    record(self, request, code, started)

            return stream_wrapper

        @functools.wraps(method)
        async def wrapper(self, request, context):
            started, code = time.perf_counter(), "OK"
            context.set_trailing_metadata(self.trailing)  # errors keep it too
            try:
                if inference:  # before any decoding: refuse at once while the loop is late
                    self.dataplane.admission.check_loop()
                    lifecycle.call_metadata.set(context.invocation_metadata)  # read for a canary's key
                return await method(self, request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                status, message = to_status(exc)
                code = status.name
                await fail(self, context, exc, status, message)
            finally:
                record(self, request, code, started)

        return wrapper

    return decorate


class _Servicer:
    def __init__(self, dataplane: DataPlane, node: str):
        self.dataplane = dataplane
        self.metrics = metrics.get()
        self.trailing = ((NODE_METADATA_KEY, node),)  # every answer names the node that gave it


# ---------------------------------------------------------------------------- Open Inference Protocol


class InferenceServicer(_Servicer, oip_grpc.GRPCInferenceServiceServicer):
    @_handled()
    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=self.dataplane.live())

    @_handled()
    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.dataplane.ready())

    @_handled("name")
    async def ModelReady(self, request, context):
        return oip.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @_handled()
    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(**self.dataplane.server_metadata())

    @_handled("name")
    async def ModelMetadata(self, request, context):
        runtime = self.dataplane.get(request.name, request.version).runtime
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=runtime.name,
            versions=sorted(self.dataplane.versions[runtime.name], key=int),  # every served version
            platform=PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in runtime.inputs.values()],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in runtime.output_specs()],
        )

    @_handled("model_name", inference=True)
    async def ModelInfer(self, request, context):
        # The signature is checked from each tensor's header before its data is decoded.
        model = self.dataplane.route(request.model_name, request.model_version)
        inputs = codec.decode_request_inputs(request, check=model.runtime.check_tensor)
        # Triton's reserved parameters: `timeout` (microseconds) is a server-side deadline.
        parameters, timeout = (codec.split_reserved(codec.parameters_to_dict(request.parameters))
                               if request.parameters else ({}, None))
        remaining = context.time_remaining()
        if timeout is not None:
            remaining = timeout if remaining is None else min(remaining, timeout)
        model, outputs = await self.dataplane.infer(
            request.model_name,
            request.model_version,
            inputs,
            parameters=parameters,
            requested_outputs=[o.name for o in request.outputs],
            remaining=remaining,
            model=model,
        )
        response = oip.ModelInferResponse(
            model_name=model.runtime.name, model_version=model.runtime.version, id=request.id
        )
        codec.add_outputs(response, outputs)
        return response


    # ------------------------------------------------------------------ Triton's extensions

    @_handled("name")
    async def ModelConfig(self, request, context):
        model = self.dataplane.get(request.name, request.version)
        replicas = (await self.dataplane.replica_counts()).get(model.runtime.name, 1)
        config = triton.model_config(model, replicas, model.runtime.max_rows)
        return oip.ModelConfigResponse(config=json_format.ParseDict(config, oip.ModelConfig()))

    @_handled("name")
    async def ModelStatistics(self, request, context):
        if request.name:  # NOT_FOUND first
            self.dataplane.get(request.name, request.version)
        names = [request.name] if request.name else sorted(self.dataplane.versions)
        keys = [(name, version) for name in names for version in sorted(self.dataplane.versions[name], key=int)
                if not request.version or version == request.version]
        statistics, _ = await self.dataplane.gateway_report()  # every worker's requests
        stats = [triton.model_statistics(name, version, statistics.of(name, version)) for name, version in keys]
        return json_format.ParseDict({"model_stats": stats}, oip.ModelStatisticsResponse())

    @_handled()
    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise ModelNotFound(f"repository '{request.repository_name}' is not served: DeepServe has one "
                                "model repository; leave repository_name empty")
        index = triton.repository_index(self.dataplane.repository, self.dataplane.versions, request.ready)
        return json_format.ParseDict({"models": index}, oip.RepositoryIndexResponse())


# ---------------------------------------------------------------------------- deepserve.v1


class FraudScoringServicer(_Servicer, v1_grpc.FraudScoringServicer):
    @_handled("model", "fraud-autoencoder", inference=True)
    async def Score(self, request, context):
        if not request.transactions:
            raise InvalidInput("transactions: empty batch; send at least one transaction")
        with_rows = [bool(t.features) for t in request.transactions]
        with_names = [bool(t.named) for t in request.transactions]
        for i, (r, n) in enumerate(zip(with_rows, with_names)):
            if r == n:
                raise InvalidInput(f"transaction {i}: set exactly one of 'features' and 'named'")
        if any(with_rows) and any(with_names):
            raise InvalidInput("transactions: use 'features' for every transaction or 'named' for every one")
        if with_rows[0]:
            rows, named = [list(t.features) for t in request.transactions], None
        else:
            rows, named = None, [dict(t.named) for t in request.transactions]
        model, results = await self.dataplane.score(
            request.model, request.version, rows, named,
            request.threshold if request.HasField("threshold") else None,
            remaining=context.time_remaining(),
            top_features=request.top_features if request.HasField("top_features") else None,
        )
        version = model.runtime.version
        return v1.ScoreResponse(
            model=model.runtime.name,
            version=version,
            results=[
                v1.FraudScore(
                    score=r.score, is_fraud=r.is_fraud, threshold=r.threshold, model_version=version,
                    top_features=[v1.FeatureContribution(name=n, error=e) for n, e in r.top_features],
                )
                for r in results
            ],
        )


class ClassifierServicer(_Servicer, v1_grpc.ClassifierServicer):
    @_handled("model", "digit-classifier", inference=True)
    async def Classify(self, request, context):
        images = []
        for i, image in enumerate(request.images):
            if bool(image.pixels) == bool(image.png):
                raise InvalidInput(f"image {i}: set exactly one of 'pixels' and 'png'")
            images.append(("png", image.png) if image.png else ("pixels", np.asarray(image.pixels, np.float32)))
        model, top = await self.dataplane.classify(
            request.model, request.version, images, request.top_k, remaining=context.time_remaining()
        )
        return v1.ClassifyResponse(
            model=model.runtime.name,
            version=model.runtime.version,
            results=[
                v1.Classification(top=[v1.LabelScore(label=label, probability=p) for label, p in row])
                for row in top
            ],
        )


class RecommenderServicer(_Servicer, v1_grpc.RecommenderServicer):
    @_handled("model", "graph-recommender", inference=True)
    async def Recommend(self, request, context):
        if len(request.neighbors) > RecommenderRuntime.MAX_NEIGHBORS:
            raise InvalidInput(f"neighbors: at most {RecommenderRuntime.MAX_NEIGHBORS}, got {len(request.neighbors)}")
        model, result = await self.dataplane.recommend(
            request.model, request.version,
            user=request.user if request.HasField("user") else None,
            neighbors=list(request.neighbors),
            k=request.k,
            exclude_known=request.exclude_known if request.HasField("exclude_known") else True,
            remaining=context.time_remaining(),
        )
        return v1.RecommendResponse(
            model=model.runtime.name, version=model.runtime.version, cold_start=result.cold_start,
            users=[v1.RecommendedUser(user=u, score=s) for u, s in zip(result.ids, result.scores)],
        )


class GeneratorServicer(_Servicer, v1_grpc.GeneratorServicer):
    def _start(self, request, context, stream: bool):
        count = request.count or 1
        if count > GenerativeRuntime.MAX_COUNT:  # before allocating anything for it
            raise InvalidInput(f"count: expected 1..{GenerativeRuntime.MAX_COUNT} images, got {count}")
        label = request.label if request.HasField("label") else -1
        return self.dataplane.generate(
            request.model, request.version,
            labels=np.full(count, label, dtype=np.int64),
            seed=request.seed if request.HasField("seed") else None,
            steps=request.steps or None,
            guidance=request.guidance if request.HasField("guidance") else None,
            sampler=request.sampler or None,
            preview_every=request.preview_every,  # validated for both; only streams carry previews
            progress=stream,
            remaining=context.time_remaining(),
        )

    async def _pngs(self, images) -> list[bytes]:
        """PNG files of generated images, encoded off the event loop."""
        return await self.dataplane.offload.run(lambda: [encode_png(image) for image in images])

    async def _response(self, model, result: GenerationResult) -> v1.GenerateResponse:
        height, width = result.images.shape[-2:]
        pngs = await self._pngs(result.images)
        return v1.GenerateResponse(
            model=model.runtime.name, version=model.runtime.version, seed=result.seed, steps=result.steps,
            guidance=result.guidance, sampler=result.sampler, height=height, width=width,
            images=[
                v1.GeneratedImage(png=png, pixels=image.ravel().tolist(), label=int(label))
                for png, image, label in zip(pngs, result.images, result.labels)
            ],
        )

    @_handled("model", "digit-diffusion", inference=True)
    async def Generate(self, request, context):
        model, events = self._start(request, context, stream=False)
        async with contextlib.aclosing(events):  # ends the dataplane's stream (and its admission) now
            async for event in events:
                if isinstance(event, GenerationResult):
                    result = event
                    break
            else:
                raise RuntimeError("the generation ended without a result")
        return await self._response(model, result)

    @_handled("model", "digit-diffusion", inference=True)
    async def GenerateStream(self, request, context):
        model, events = self._start(request, context, stream=True)
        async for event in events:
            if isinstance(event, GenerationResult):
                yield v1.GenerateEvent(result=await self._response(model, event))
            else:
                previews = [] if event.previews is None else await self._pngs(event.previews)
                yield v1.GenerateEvent(
                    progress=v1.GenerateProgress(step=event.step, steps=event.steps, previews=previews))


class ModelsServicer(_Servicer, v1_grpc.ModelsServicer):
    @_handled()
    async def ListModels(self, request, context):
        _, reports = await self.dataplane.gateway_report()  # batch figures of every worker
        infos = []
        for name in sorted(self.dataplane.versions):
            plan = self.dataplane.plans[name]
            for version in sorted(self.dataplane.versions[name], key=int):
                infos.append(self._info(self.dataplane.versions[name][version], plan, reports))
        return v1.ListModelsResponse(models=infos)

    @staticmethod
    def _info(model, plan, reports) -> v1.ModelInfo:
        name, version = model.runtime.name, model.runtime.version
        report = reports.get((name, version)) or model.replica_info
        manifest = model.runtime.manifest
        role = plan.role(version)
        share = {"default": 1.0 - plan.weight, "canary": plan.weight, "shadow": plan.fraction}.get(role, 0.0)
        return v1.ModelInfo(
            name=name, version=manifest.version, kind=manifest.kind, ready=model.ready, role=role, share=share,
            execution_provider=model.provider, sha256=manifest.sha256,
            load_seconds=float(model.replica_info.get("load_seconds", 0.0)),
            metrics={k: float(v) for k, v in manifest.metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
            batching={k: float(report[k]) for k in BATCHING_FIELDS if k in report},
        )


# ---------------------------------------------------------------------------- server


SERVICE_NAMES = (
    "inference.GRPCInferenceService",
    "deepserve.v1.FraudScoring",
    "deepserve.v1.Classifier",
    "deepserve.v1.Generator",
    "deepserve.v1.Recommender",
    "deepserve.v1.Models",
)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool with every served file: inference.proto lives in a private pool of its own
    (see scripts/gen_protos.py), the others in the default one."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_descriptor) -> None:
        if file_descriptor.name in added:
            return
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        pool.Add(proto)
        added.add(file_descriptor.name)

    for module in (oip, v1, health_pb2):
        add(module.DESCRIPTOR)
    return pool


class GrpcServer:
    """Both APIs, health (overall and per model) and, when enabled, reflection on one port.

    Args:
        dataplane: what every servicer calls.
        host, port: where to listen (port 0: any free port).
        max_message_bytes: largest message received or sent.
        node: the name every answer carries in its ``deepserve-node`` trailing metadata.
        max_connection_age_s: the server closes each client connection (GOAWAY, after which
            the client reconnects, letting calls in flight finish for ``grace_s``) once it is
            this old. HTTP/2 connections otherwise stay with the gateway they first reached,
            and a gateway that joins later would get no traffic from long-lived clients.
        security: the port's TLS credentials and the token interceptor
            (:meth:`ServerSecurity.from_settings`); default: plaintext, no authentication.
        reflection: serve gRPC server reflection.
        max_concurrent_rpcs: calls this server works on at once, of every kind; beyond it
            grpc.aio leaves new calls in gRPC's queue (it does not refuse them). None: no bound.
        health_port: also serve ``grpc.health.v1`` alone, in plaintext, on this port: for probes
            that cannot speak TLS (Kubernetes' gRPC probes). None: health only on ``port``.
        reuse_port: share the ports with the other servers of this gateway (SO_REUSEPORT: the
            kernel spreads new connections over them). The gateway replica checks first that
            no other process holds them (:func:`deepserve.gateway.replica.claim_port`).
        unix_socket: listen on this unix socket path instead of ``host:port`` (a worker behind
            the admission front, :mod:`deepserve.gateway.front`).
        health_unix_socket: like ``health_port``, on this unix socket path (behind the front,
            which serves the health port).

    Raises:
        RuntimeError: a port cannot be bound: without ``reuse_port``, any process holding it.
    """

    def __init__(self, dataplane: DataPlane, host: str, port: int, max_message_bytes: int, node: str,
                 max_connection_age_s: float = 60.0, grace_s: float = 30.0,
                 security: ServerSecurity | None = None, reflection: bool = False,
                 health_port: int | None = None, max_concurrent_rpcs: int | None = None,
                 reuse_port: bool = False, unix_socket: str | None = None,
                 health_unix_socket: str | None = None):
        self.dataplane = dataplane
        self.security = security or ServerSecurity()
        # Beyond max_concurrent_rpcs, grpc.aio takes no new call until one ends.
        # Services register through TolerantRegistry (services/wire.py): a request that does not
        # parse is INVALID_ARGUMENT. The token check, an interceptor, decides before any parsing.
        self.server = grpc.aio.server(interceptors=self.security.interceptors,
                                      maximum_concurrent_rpcs=max_concurrent_rpcs, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),  # only this gateway's own workers share the port
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
            # Clients ping idle connections to notice a lost node (deepserve.client): allow it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ])
        registry = TolerantRegistry(self.server)
        for add, servicer in (
            (oip_grpc.add_GRPCInferenceServiceServicer_to_server, InferenceServicer),
            (v1_grpc.add_FraudScoringServicer_to_server, FraudScoringServicer),
            (v1_grpc.add_ClassifierServicer_to_server, ClassifierServicer),
            (v1_grpc.add_GeneratorServicer_to_server, GeneratorServicer),
            (v1_grpc.add_RecommenderServicer_to_server, RecommenderServicer),
            (v1_grpc.add_ModelsServicer_to_server, ModelsServicer),
        ):
            add(servicer(dataplane, node), registry)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registry)
        self.reflection = reflection
        if reflection:
            names = (*SERVICE_NAMES, "grpc.health.v1.Health", grpc_reflection.SERVICE_NAME)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                grpc_reflection.aio.ReflectionServicer(names, pool=_reflection_pool()), registry)
        if unix_socket is not None:  # behind the front: TLS, if any, ends there
            self.address = f"unix:{unix_socket}"
            self._listen(self.server, self.address, None, "grpc_port")
            self.port = 0
        else:
            self.address = f"{host}:{port}"
            self.port = self._listen(self.server, self.address, self.security.credentials, "grpc_port")
        self.health_server = None
        if health_port is not None or health_unix_socket is not None:  # health alone, open: nothing else
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, TolerantRegistry(self.health_server))
            on_unix = health_unix_socket is not None
            bound = self._listen(self.health_server, f"unix:{health_unix_socket}" if on_unix
                                 else f"{host}:{health_port}", None, "health_port")
            self.health_port = 0 if on_unix else bound

    @staticmethod
    def _listen(server, address: str, credentials, setting: str) -> int:
        """Bind ``server`` to ``address`` (``host:port`` or ``unix:path``); the port it got."""
        try:  # grpcio raises on a failed bind; older releases returned 0
            bound = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        except RuntimeError:
            bound = 0
        if bound != 0:
            return bound
        if address.startswith("unix:"):
            raise RuntimeError(f"cannot listen on {address}: its directory is missing or not writable")
        port = address.rsplit(":", 1)[1]
        raise RuntimeError(f"cannot listen on gRPC port {port} ({address}; {setting}, "
                           f"DEEPSERVE_{setting.upper()}): another process holds it, or the host is not "
                           "an address of this machine. Stop that process or choose another port.")

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self.publish_health()
        log.info("gRPC server listening on %s (%s; reflection %s)", self.address, self.security.summary,
                 "on" if self.reflection else "off")

    async def publish_health(self) -> None:
        """Mirror the dataplane's readiness into grpc.health.v1 (overall and per model)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name, model in self.dataplane.models.items():
            await self.health.set(name, serving if model.ready else not_serving)
        await self.health.set("", serving if self.dataplane.ready() else not_serving)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:  # says NOT_SERVING while the main port drains
            await self.health_server.stop(0)
