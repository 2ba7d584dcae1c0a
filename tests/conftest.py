"""Shared fixtures: real MQTT brokers on free loopback ports, started by the tests.

- ``mosquitto``: a mosquitto 2.x with the default configuration (anonymous, persistence
  in a temporary folder), stopped after the test.
- ``mosquitto_factory(**kwargs)``: start more, or differently configured, mosquittos
  (same keyword arguments as :func:`broker.launch.start_mosquitto`, ``workdir`` optional).
- ``embedded_broker``: the embedded amqtt broker (MQTT 3.1.1) in a child process.
- ``embedded_factory(**kwargs)``: same, for :func:`broker.launch.start_embedded`.
- ``broker``: parametrised over ``"mosquitto"`` and ``"embedded"`` for tests that must
  pass on both. Every handle has ``url``, ``port``, ``protocol`` ("5" / "3.1.1"),
  ``stop()``, ``restart()``, ``kill()``.

A missing mosquitto binary fails the test (BrokerLaunchError), it never skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from broker.launch import EmbeddedBrokerProcess, MosquittoProcess, start_embedded, start_mosquitto

torch.set_num_threads(1)


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MosquittoProcess]]:
    started: list[MosquittoProcess] = []

    def factory(workdir: Path | None = None, **kwargs: object) -> MosquittoProcess:
        folder = workdir if workdir is not None else tmp_path_factory.mktemp("mosquitto")
        proc = start_mosquitto(folder, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoProcess]) -> MosquittoProcess:
    return mosquitto_factory()


@pytest.fixture
def embedded_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EmbeddedBrokerProcess]]:
    started: list[EmbeddedBrokerProcess] = []

    def factory(port: int | None = None) -> EmbeddedBrokerProcess:
        proc = start_embedded(port, log_dir=tmp_path_factory.mktemp("embedded"))
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def embedded_broker(embedded_factory: Callable[..., EmbeddedBrokerProcess]) -> EmbeddedBrokerProcess:
    return embedded_factory()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> MosquittoProcess | EmbeddedBrokerProcess:
    if request.param == "mosquitto":
        return request.getfixturevalue("mosquitto")
    return request.getfixturevalue("embedded_broker")
