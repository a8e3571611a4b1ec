"""Which execution provider a replica's session gets: CUDA only on the GPU Ray assigned."""

from __future__ import annotations

from deepserve.runtime import CPU, CUDA, assigned_gpus, choose_providers

BOTH = [CUDA, CPU]


def test_no_assigned_gpu_means_cpu_even_where_cuda_exists():
    assert choose_providers([], BOTH, "0,1") == [CPU]
    assert choose_providers(["0"], [CPU], "0") == [CPU]  # onnxruntime without CUDA


def test_the_assigned_gpu_by_its_place_among_the_visible_ones():
    assert choose_providers(["3"], BOTH, "3") == [(CUDA, {"device_id": 0}), CPU]  # Ray narrowed it to one
    assert choose_providers(["3"], BOTH, "2,3") == [(CUDA, {"device_id": 1}), CPU]
    assert choose_providers(["1"], BOTH, None) == [(CUDA, {"device_id": 1}), CPU]  # nothing narrowed


def test_cpu_can_be_forced(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_PROVIDER", "cpu")
    assert choose_providers(["0"], BOTH, "0") == [CPU]


def test_served_replicas_without_gpus_run_on_the_cpu(server, client):
    assert assigned_gpus() == []  # the test cluster has no GPUs: Ray assigned none to this driver
    providers = {m.name: m.execution_provider for m in client.list_models().models}
    assert set(providers.values()) == {CPU}, providers
