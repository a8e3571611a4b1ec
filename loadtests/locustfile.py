"""Locust load tests for DeepServe, over real gRPC.

    locust -f loadtests/locustfile.py --host 127.0.0.1:9000 MixUser      # web UI
    python loadtests/run.py --host 127.0.0.1:9000 --duration 20           # headless, SLO checks

Locust has no gRPC user, so :class:`GrpcUser` is one: a channel held for the user's
lifetime (as a real client holds one), the generated stubs, and one Locust request event
per call (a failed call's exception message starts with its gRPC status code).

A *workload* is one kind of request (:class:`Workload`): the model it needs, its payloads
(built once per process from seeded data) and how to send one. At start each user asks
``Models.ListModels`` what is served and runs only the workloads whose model is, so a
workload for a model that is not deployed (a generator, a recommender) simply sits idle.
Adding a workload is one small ``Workload`` subclass plus an entry in a user's
``workloads`` table.

Settings (environment, read when a user starts):
    DEEPSERVE_LOADTEST_WAIT     think time between a user's calls, in seconds: ``0`` (default:
                                closed loop), ``0.05`` (constant) or ``0.01-0.1`` (uniform).
    DEEPSERVE_LOADTEST_TIMEOUT  per-call deadline in seconds (default 10).
    DEEPSERVE_LOADTEST_SEED     seed of the payloads and of each user's choices (default 0).
    DEEPSERVE_LOADTEST_WAIT_FOR_READY  ``1``: calls wait for a connection until their deadline
                                instead of failing at once while no gateway answers (default 0;
                                see ``wait_for_ready`` in deepserve.client).
"""

from __future__ import annotations

import locust  # first: importing locust monkey-patches the standard library with gevent

import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import grpc
import numpy as np
from gevent import monkey
from google.protobuf.message import Message
from locust import User, task
from locust.exception import StopUser

from deepserve.client import NODE_METADATA_KEY, open_channel
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc

# grpc's C core runs its own threads and polling; under gevent it must hand them to the hub,
# or a blocking call would freeze every other user of this process. This has to happen
# before any channel exists.
if monkey.is_module_patched("socket"):
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()

log = logging.getLogger("deepserve.loadtest")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    wait: tuple[float, float]  # (min, max) think time in seconds
    timeout: float
    seed: int
    wait_for_ready: bool = False

    @classmethod
    def from_env(cls) -> "Settings":
        wait = os.environ.get("DEEPSERVE_LOADTEST_WAIT", "0").strip()
        low, _, high = wait.partition("-")
        bounds = (float(low), float(high or low))
        if not 0 <= bounds[0] <= bounds[1]:
            raise ValueError(f"DEEPSERVE_LOADTEST_WAIT={wait!r}: want S or MIN-MAX seconds, MIN <= MAX")
        return cls(
            wait=bounds,
            timeout=float(os.environ.get("DEEPSERVE_LOADTEST_TIMEOUT", "10")),
            seed=int(os.environ.get("DEEPSERVE_LOADTEST_SEED", "0")),
            wait_for_ready=os.environ.get("DEEPSERVE_LOADTEST_WAIT_FOR_READY", "0") == "1",
        )


# ---------------------------------------------------------------------------- seeded data

SCHEMA_WIDTH = 30  # Time, V1..V28, Amount: the fraud model's input columns


def transactions(n: int, seed: int) -> np.ndarray:
    """``n`` card transactions in the fraud model's schema, chronological, float32.

    Shaped like the training table (``deepserve.models.fraud``), without importing torch:
    V1..V28 are PCA-like components driven by a few latent factors with falling variances,
    the amount is log-normal, the time spans two days with a daytime peak. The values do not
    change what a request costs; they keep the scores and decisions in a plausible range.

    Returns:
        (n, 30) array.
    """
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))  # (N, 6)
    mixing = rng.normal(size=(6, 28)) / np.sqrt(6) * np.linspace(2.0, 0.4, 28)  # (6, 28)
    v = latent @ mixing + rng.normal(scale=0.25, size=(n, 28))  # (N, 28)
    hour = rng.normal(14.0, 4.0, size=n) % 24
    seconds = rng.integers(0, 2, size=n) * 86_400.0 + hour * 3600.0
    amount = np.expm1(np.clip(rng.normal(3.5, 1.0, size=n) + 0.3 * latent[:, 0], 0, None))
    x = np.column_stack([seconds, v, amount])  # (N, 30)
    return x[np.argsort(seconds, kind="stable")].astype(np.float32)


def digit_images() -> np.ndarray:
    """sklearn's 1,797 8x8 digits scaled to [0, 1], as the digit classifiers expect: (N, 64)."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    return (load_digits().images / 16.0).reshape(-1, 64).astype(np.float32)


# ---------------------------------------------------------------------------- workloads


@dataclass
class Stubs:
    """One channel and the stubs on it."""

    channel: grpc.Channel
    fraud: v1_grpc.FraudScoringStub
    classifier: v1_grpc.ClassifierStub
    models: v1_grpc.ModelsStub
    inference: oip_grpc.GRPCInferenceServiceStub
    generator: v1_grpc.GeneratorStub
    recommender: v1_grpc.RecommenderStub

    @classmethod
    def open(cls, target: str, wait_for_ready: bool = False) -> "Stubs":
        # Round robin over the target's addresses, with retries.
        channel = open_channel(target, wait_for_ready=wait_for_ready)
        return cls(channel, v1_grpc.FraudScoringStub(channel), v1_grpc.ClassifierStub(channel),
                   v1_grpc.ModelsStub(channel), oip_grpc.GRPCInferenceServiceStub(channel),
                   v1_grpc.GeneratorStub(channel), v1_grpc.RecommenderStub(channel))


class WrongAnswer(Exception):
    """The call succeeded but the answer does not fit the request."""


class Workload:
    """One kind of request. Subclasses set ``name`` and ``model`` and implement ``build`` and
    ``send``; ``check`` may reject an answer that does not fit its request."""

    name: ClassVar[str]  # request name in Locust's statistics
    model: ClassVar[str]  # the served model this workload needs
    pool_size: ClassVar[int] = 256  # distinct requests to cycle through

    _shared: ClassVar[dict[type, "Workload"]] = {}

    def __init__(self, seed: int):
        self.requests: list[Message] = self.build(seed)

    @classmethod
    def shared(cls, seed: int) -> "Workload":
        """This process's instance: payloads are built once, whatever the number of users."""
        if cls not in Workload._shared:
            Workload._shared[cls] = cls(seed)
        return Workload._shared[cls]

    def build(self, seed: int) -> list[Message]:
        raise NotImplementedError

    def send(self, stubs: Stubs, request: Message, timeout: float) -> tuple[Message, grpc.Call]:
        """Make the call with ``with_call``: the answer and the call (its trailing metadata
        names the node that answered)."""
        raise NotImplementedError

    def check(self, request: Message, response: Message) -> None:
        pass


class FraudScore(Workload):
    """A payment authorisation: one transaction scored through ``deepserve.v1``."""

    name = "FraudScoring.Score"
    model = "fraud-autoencoder"

    def build(self, seed):
        rows = transactions(self.pool_size, seed)
        return [v1.ScoreRequest(model=self.model, transactions=[v1.Transaction(features=r)]) for r in rows]

    def send(self, stubs, request, timeout):
        return stubs.fraud.Score.with_call(request, timeout=timeout)

    def check(self, request, response):
        if len(response.results) != len(request.transactions):
            raise WrongAnswer(f"{len(response.results)} results for {len(request.transactions)} transactions")


class FraudScoreBatch(FraudScore):
    """A back-office sweep: 64 transactions per ``Score`` call."""

    name = "FraudScoring.Score[64]"
    batch = 64
    pool_size = 32

    def build(self, seed):
        rows = transactions(self.pool_size * self.batch, seed + 1).reshape(self.pool_size, self.batch, -1)
        return [v1.ScoreRequest(model=self.model, transactions=[v1.Transaction(features=r) for r in chunk])
                for chunk in rows]


class FraudInfer(Workload):
    """One transaction through the Open Inference Protocol, as a Triton/KServe client sends it."""

    name = "ModelInfer[fraud-autoencoder]"
    model = "fraud-autoencoder"

    def build(self, seed):
        rows = transactions(self.pool_size, seed + 2)
        tensor = oip.ModelInferRequest.InferInputTensor(name="transactions", datatype="FP32", shape=[1, SCHEMA_WIDTH])
        return [oip.ModelInferRequest(model_name=self.model, inputs=[tensor],
                                      raw_input_contents=[r.astype("<f4").tobytes()]) for r in rows]

    def send(self, stubs, request, timeout):
        return stubs.inference.ModelInfer.with_call(request, timeout=timeout)

    def check(self, request, response):
        if "score" not in {o.name for o in response.outputs}:
            raise WrongAnswer("no 'score' output")


class Classify(Workload):
    """One 8x8 digit, pixels in [0, 1], top-3 labels."""

    name = "Classifier.Classify"
    model = "digit-classifier"

    def build(self, seed):
        images = digit_images()
        picks = np.random.default_rng(seed + 3).choice(len(images), size=self.pool_size, replace=False)
        return [v1.ClassifyRequest(model=self.model, images=[v1.Image(pixels=images[i])], top_k=3) for i in picks]

    def send(self, stubs, request, timeout):
        return stubs.classifier.Classify.with_call(request, timeout=timeout)

    def check(self, request, response):
        if len(response.results) != 1 or len(response.results[0].top) != 3:
            raise WrongAnswer("want 1 result with 3 labels")


class ClassifyRobust(Classify):
    """The same images to digit-classifier-robust: placed ``deployment`` in the shipped config,
    so each call crosses a Serve handle to a replica of its own."""

    name = "Classifier.Classify[robust]"
    model = "digit-classifier-robust"


class Generate(Workload):
    """One diffusion image of a digit with the model's defaults (20 DDIM steps, guided)."""

    name = "Generator.Generate[diffusion]"
    model = "digit-diffusion"
    pool_size = 64

    def build(self, seed):
        return [v1.GenerateRequest(model=self.model, label=i % 10, count=1, seed=seed * 1000 + i)
                for i in range(self.pool_size)]

    def send(self, stubs, request, timeout):
        return stubs.generator.Generate.with_call(request, timeout=timeout)

    def check(self, request, response):
        if len(response.images) != request.count or response.seed != request.seed:
            raise WrongAnswer(f"want {request.count} image(s) for seed {request.seed}")


class GenerateGan(Generate):
    """Four GAN images of a digit (one network evaluation)."""

    name = "Generator.Generate[dcgan]"
    model = "digit-dcgan"

    def build(self, seed):
        return [v1.GenerateRequest(model=self.model, label=i % 10, count=4, seed=seed * 1000 + i)
                for i in range(self.pool_size)]


class Recommend(Workload):
    """"People you may know" for a user of the synthetic graph (ids 0..4,999; these use 0..999)."""

    name = "Recommender.Recommend"
    model = "graph-recommender"

    def build(self, seed):
        users = np.random.default_rng(seed + 4).choice(1000, size=self.pool_size, replace=False)
        return [v1.RecommendRequest(model=self.model, user=int(u), k=10) for u in users]

    def send(self, stubs, request, timeout):
        return stubs.recommender.Recommend.with_call(request, timeout=timeout)

    def check(self, request, response):
        if len(response.users) != request.k:
            raise WrongAnswer(f"{len(response.users)} users for k={request.k}")


class RecommendColdStart(Recommend):
    """A new user described by 3..12 known neighbours (inductive cold start)."""

    name = "Recommender.Recommend[cold]"

    def build(self, seed):
        rng = np.random.default_rng(seed + 5)
        return [v1.RecommendRequest(model=self.model, k=10,
                                    neighbors=rng.choice(1000, size=rng.integers(3, 13), replace=False).tolist())
                for _ in range(self.pool_size)]

    def check(self, request, response):
        super().check(request, response)
        if not response.cold_start:
            raise WrongAnswer("a new user's answer should say cold_start")


# ---------------------------------------------------------------------------- users


class GrpcError(Exception):
    """A failed call; the message starts with the status code, e.g. ``UNAVAILABLE: ...``."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        super().__init__(f"{code.name}: {details or ''}".rstrip(": "))
        self.code = code


class GrpcUser(User):
    """A Locust user with one gRPC channel. Subclasses list their ``workloads`` with weights."""

    abstract = True
    workloads: ClassVar[dict[type[Workload], float]] = {}
    host = "127.0.0.1:9000"  # host:port, no scheme

    _ids: ClassVar[itertools.count] = itertools.count()

    def on_start(self) -> None:
        self.settings = Settings.from_env()
        self.rng = random.Random(self.settings.seed * 1_000_003 + next(GrpcUser._ids))
        self.stubs = Stubs.open(self.host, self.settings.wait_for_ready)
        self.active: list[Workload] = []  # what this user runs, once ListModels has answered
        self.weights: list[float] = []

    def discover(self) -> bool:
        """Ask the server what it serves and keep the workloads it can answer.

        Returns:
            False when ListModels failed (reported; the next task asks again).

        Raises:
            StopUser: none of this user's workloads has its model served.
        """
        listing = self.call("Models.ListModels",
                            lambda t: self.stubs.models.ListModels.with_call(v1.ListModelsRequest(), timeout=t))
        if listing is None:
            return False
        served = {m.name for m in listing.models}
        active = served_workloads(type(self), served)
        if not active:
            log.error("%s stops: none of its workloads' models is served (served: %s)",
                      type(self).__name__, ", ".join(sorted(served)))
            raise StopUser()
        self.active = [w.shared(self.settings.seed) for w in active]
        self.weights = list(active.values())
        return True

    def on_stop(self) -> None:
        if hasattr(self, "stubs"):
            self.stubs.channel.close()

    def wait_time(self) -> float:
        low, high = self.settings.wait
        return low if low == high else self.rng.uniform(low, high)

    @task
    def send_one(self) -> None:
        if not self.active and not self.discover():
            return
        workload = self.rng.choices(self.active, self.weights)[0]
        request = self.rng.choice(workload.requests)
        self.call(workload.name, lambda t: workload.send(self.stubs, request, t),
                  lambda response: workload.check(request, response))

    def call(self, name: str, send: Callable[[float], tuple[Message, grpc.Call]],
             check: Callable[[Message], None] | None = None) -> Message | None:
        """Time ``send(timeout)`` and report it to Locust, with the node that answered
        (``context["node"]``, from the ``deepserve-node`` trailing metadata) and the wall-clock
        second it ended in (``context["second"]``).

        Returns:
            The response, or None when the call failed.
        """
        response, exception, length, trailing = None, None, 0, None
        start = time.perf_counter()
        try:
            response, rpc = send(self.settings.timeout)
            trailing = rpc.trailing_metadata()
            length = response.ByteSize()
            if check is not None:
                check(response)
        except grpc.RpcError as e:
            exception = GrpcError(e.code(), e.details())
            trailing = e.trailing_metadata() if isinstance(e, grpc.Call) else None
        except WrongAnswer as e:
            exception = e
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        node = next((v for k, v in trailing or () if k == NODE_METADATA_KEY), "")
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=elapsed_ms, response_length=length,
            exception=exception, context={"node": node, "second": int(time.time())},
        )
        return response if exception is None else None


def prepare(user_classes: list[type[User]], seed: int) -> None:
    """Build the payloads of every workload the user classes may run, before any user starts.

    Built inside a user instead, the work would hold the one gevent hub and stall (and skew
    the timings of) every call other users have in flight.
    """
    for user_class in user_classes:
        for workload in getattr(user_class, "workloads", {}):
            workload.shared(seed)


@locust.events.test_start.add_listener
def _prepare_payloads(environment, **_) -> None:
    prepare(environment.user_classes, Settings.from_env().seed)


def served_workloads(user_class: type[GrpcUser], served: set[str]) -> dict[type[Workload], float]:
    """The workloads (with weights) that ``user_class`` runs when ``served`` models are up."""
    return {w: weight for w, weight in user_class.workloads.items() if w.model in served}


class FraudScoreUser(GrpcUser):
    workloads = {FraudScore: 1}


class FraudBatchUser(GrpcUser):
    workloads = {FraudScoreBatch: 1}


class FraudInferUser(GrpcUser):
    workloads = {FraudInfer: 1}


class ClassifyUser(GrpcUser):
    workloads = {Classify: 1}


class GenerateUser(GrpcUser):
    workloads = {Generate: 3, GenerateGan: 1}


class DiffusionUser(GrpcUser):
    """Diffusion only: the load that makes digit-diffusion's replicas scale."""

    workloads = {Generate: 1}


class RecommendUser(GrpcUser):
    workloads = {Recommend: 3, RecommendColdStart: 1}


class BothPathsUser(GrpcUser):
    """Half fraud scoring (computed in the gateway), half the robust classifier (a replica
    behind a Serve handle): a fault on either path shows in its own row
    (tests/reliability/test_faults_under_load.py)."""

    workloads = {FraudScore: 1, ClassifyRobust: 1}


class EveryModelUser(GrpcUser):
    """Every workload, evenly: a smoke test of the whole service under load."""

    workloads = {FraudScore: 1, FraudScoreBatch: 1, FraudInfer: 1, Classify: 1, Generate: 1, GenerateGan: 1,
                 Recommend: 1, RecommendColdStart: 1}


class MixUser(GrpcUser):
    """The default: traffic as production sees it, fraud scoring dominating."""

    workloads = {FraudScore: 70, FraudScoreBatch: 10, FraudInfer: 10, Classify: 10}
