"""The HTTP app over real HTTP (uvicorn on a free loopback port): the Open Inference Protocol
routes, their answers to bad input, readiness, versions, overload, metrics and the webhook."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
import uvicorn
from fastapi import FastAPI
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
from pydantic import SecretStr

from heimdall.data import generate
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.serving.app import JSON_DECODE_FACTOR, _InFlight, create_app, in_flight_budget
from heimdall.serving.backend import Inferred, Limits, Served
from heimdall.serving.batching import Batcher, Overloaded
from heimdall.serving.metrics import Metrics
from heimdall.serving.protocol import HEADER_LENGTH, SAMPLE_BYTES
from heimdall.serving.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

NAME = "localization"
SECRET = "webhook-secret-for-tests"
LIMITS = Limits(max_request_samples=32, max_batch=8, max_wait_ms=2, max_queue_samples=64)


class FakeFault(Exception):
    """What an unexpected bug inside a backend looks like to the app."""


class TestBackend:
    """A backend as the server builds one: a current Served and a Batcher over it."""

    __test__ = False

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.limits = LIMITS
        self.webhook_secret: SecretStr | None = SecretStr(SECRET)
        self.batcher = Batcher(LIMITS, self.metrics)
        self.served: Served | None = None
        self.fault: Exception | None = None
        self.notified: list[tuple[str, str]] = []

    @property
    def current(self) -> Served | None:
        return self.served

    async def infer(self, features: np.ndarray) -> Inferred:
        if self.fault is not None:
            raise self.fault
        served = self.served
        assert served is not None
        positions, uncertainties = await self.batcher.run(served, features)
        return Inferred(served, positions, uncertainties)

    def notify(self, name: str, alias: str) -> None:
        self.notified.append((name, alias))


@pytest.fixture(scope="module")
def model(atto_onnx: ExportResult) -> LocalizationModel:
    return LocalizationModel.load(atto_onnx.path)


@pytest.fixture(scope="module")
def served(model: LocalizationModel) -> Served:
    return Served(model, NAME, "3", model.sha256, "production", "models:/localization@production")


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return generate(4, seed=21)[0]


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[str, TestBackend]]:
    backend = TestBackend()
    with serving(create_app(backend)) as url:
        yield url, backend


@pytest.fixture
def url(running: tuple[str, TestBackend], backend: TestBackend) -> str:
    return running[0]


@pytest.fixture
def backend(running: tuple[str, TestBackend], served: Served) -> TestBackend:
    backend = running[1]
    backend.served, backend.fault, backend.webhook_secret = served, None, SecretStr(SECRET)
    backend.notified.clear()
    return backend


def _json_request(features: np.ndarray, **request: Any) -> dict[str, Any]:
    tensor = {
        "name": "mel_spectrogram",
        "datatype": "FP32",
        "shape": list(features.shape),
        "data": features.ravel().tolist(),
    }
    return {"inputs": [tensor], **request}


def _binary_request(features: np.ndarray, **request: Any) -> tuple[bytes, dict[str, str]]:
    raw = features.astype("<f4").tobytes()
    tensor = {
        "name": "mel_spectrogram",
        "datatype": "FP32",
        "shape": list(features.shape),
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], **request}).encode()
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + raw, headers


def _error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return str(body["error"])


def test_json_infer_gives_model_predict_and_names_the_model(
    url: str, model: LocalizationModel, features: np.ndarray
) -> None:
    response = requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"]) == (NAME, "3")
    assert body["parameters"] == {"sha256": model.sha256, "alias": "production"}
    expected = model.predict(features)
    outputs = {
        o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]
    }
    np.testing.assert_array_equal(outputs["positions"], expected.positions)
    np.testing.assert_array_equal(outputs["uncertainties"], expected.uncertainties)


def test_binary_infer_on_the_served_version_parses_back(
    url: str, model: LocalizationModel, features: np.ndarray
) -> None:
    body, headers = _binary_request(
        features, id="r-9", parameters={"binary_data_output": True}, outputs=[{"name": "positions"}]
    )
    response = requests.post(f"{url}/v2/models/{NAME}/versions/3/infer", data=body, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:length])
    assert header["id"] == "r-9" and header["model_version"] == "3"
    (output,) = header["outputs"]
    raw = response.content[length:]
    assert len(raw) == output["parameters"]["binary_data_size"]
    positions = np.frombuffer(raw, "<f4").reshape(output["shape"])
    np.testing.assert_array_equal(positions, model.predict(features).positions)


def test_health_and_metadata_routes(url: str, backend: TestBackend) -> None:
    assert requests.get(f"{url}/v2/health/live").status_code == 200
    assert requests.get(f"{url}/v2/health/ready").status_code == 200
    server = requests.get(f"{url}/v2").json()
    assert server["name"] == "heimdall" and server["extensions"] == ["binary_tensor_data"]
    metadata = requests.get(f"{url}/v2/models/{NAME}/versions/3").json()
    assert metadata["versions"] == ["3"]
    assert metadata["inputs"][0]["shape"] == [-1, 3, 128, 32]
    assert metadata["parameters"]["source"] == "models:/localization@production"
    assert requests.get(f"{url}/v2/models/{NAME}/ready").status_code == 200


def test_not_ready_until_a_model_is_served(
    url: str, backend: TestBackend, features: np.ndarray
) -> None:
    backend.served = None
    assert requests.get(f"{url}/v2/health/live").status_code == 200
    assert "no verified model" in _error(requests.get(f"{url}/v2/health/ready"), 503)
    _error(requests.get(f"{url}/v2/models/{NAME}/ready"), 503)
    _error(requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features)), 503)


def test_another_version_or_model_is_refused_naming_the_served_one(
    url: str, features: np.ndarray
) -> None:
    wrong_version = requests.post(
        f"{url}/v2/models/{NAME}/versions/2/infer", json=_json_request(features)
    )
    assert "version 3 (@production) is" in _error(wrong_version, 404)
    _error(requests.get(f"{url}/v2/models/{NAME}/versions/2/ready"), 404)
    other = requests.post(f"{url}/v2/models/other/infer", json=_json_request(features))
    assert f"serves {NAME!r}" in _error(other, 404)
    assert "Not Found" in _error(requests.get(f"{url}/v2/nothing"), 404)


def test_an_app_without_a_backend_answers_one_line_not_a_crash() -> None:
    with serving(create_app()) as url:
        assert requests.get(f"{url}/v2/health/live").status_code == 200
        assert "app.state.backend" in _error(requests.get(f"{url}/v2/health/ready"), 503)


def test_a_version_in_the_query_string_is_not_a_version(url: str, features: np.ndarray) -> None:
    response = requests.post(
        f"{url}/v2/models/{NAME}/infer", params={"version": "2"}, json=_json_request(features)
    )
    assert response.status_code == 200, response.text


def test_a_swap_between_requests_is_named_in_the_next_answer(
    url: str, backend: TestBackend, model: LocalizationModel, features: np.ndarray
) -> None:
    backend.served = Served(model, NAME, "4", model.sha256, "production", "models:/x")
    response = requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features))
    assert response.json()["model_version"] == "4"
    old = requests.post(f"{url}/v2/models/{NAME}/versions/3/infer", json=_json_request(features))
    assert "version 4" in _error(old, 404)


def test_bad_inputs_get_a_4xx_line(url: str, features: np.ndarray) -> None:
    infer = f"{url}/v2/models/{NAME}/infer"
    nan = features.copy()
    nan[0, 0, 0, 0] = np.nan
    body, headers = _binary_request(nan)
    assert "NaN" in _error(requests.post(infer, data=body, headers=headers), 400)
    assert "shape" in _error(requests.post(infer, json=_json_request(features[:, :, :, :31])), 400)
    wrong_type = _json_request(features)
    wrong_type["inputs"][0]["datatype"] = "INT8"
    assert "FP32" in _error(requests.post(infer, json=wrong_type), 400)
    body, headers = _binary_request(features)
    assert "follow the JSON header" in _error(
        requests.post(infer, data=body[:-1], headers=headers), 400
    )
    assert "not valid JSON" in _error(requests.post(infer, data=b"{", headers={}), 400)
    zipped = requests.post(infer, data=b"x", headers={"Content-Encoding": "gzip"})
    assert "Content-Encoding" in _error(zipped, 415)


def test_oversized_requests_are_refused_before_reading(url: str, features: np.ndarray) -> None:
    infer = f"{url}/v2/models/{NAME}/infer"
    declared = {
        "inputs": [
            {
                "name": "mel_spectrogram",
                "datatype": "FP32",
                "shape": [10**8, 3, 128, 32],
                "parameters": {"binary_data_size": 10**8 * SAMPLE_BYTES},
            }
        ]
    }
    header = json.dumps(declared).encode()
    tiny = requests.post(infer, data=header + b"\0" * 8, headers={HEADER_LENGTH: str(len(header))})
    assert "at most 32" in _error(tiny, 413)
    big = np.zeros((LIMITS.max_request_samples + 2, 3, 128, 32), np.float32)
    body, headers = _binary_request(big)
    assert "exceeds" in _error(requests.post(infer, data=body, headers=headers), 413)
    chunked = requests.post(
        infer, data=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers=headers
    )
    assert "exceeds" in _error(chunked, 413)


def test_overload_answers_503_with_retry_after(
    url: str, backend: TestBackend, features: np.ndarray
) -> None:
    backend.fault = Overloaded("the server is busy; retry shortly")
    response = requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features))
    assert "busy" in _error(response, 503)
    assert response.headers["Retry-After"] == "1"


def test_an_unexpected_fault_is_a_scrubbed_500_and_the_server_goes_on(
    url: str, backend: TestBackend, features: np.ndarray
) -> None:
    backend.fault = FakeFault("s3://user:hunter2@bucket broke\nTraceback (most recent call last)")
    message = _error(
        requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features)), 500
    )
    assert "FakeFault" in message and "hunter2" not in message
    backend.fault = None
    assert requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features)).ok


def test_concurrent_clients_each_get_their_own_rows(
    url: str, backend: TestBackend, model: LocalizationModel
) -> None:
    samples = generate(16, seed=4)[0]
    expected = model.predict(samples).positions

    def one(i: int) -> np.ndarray:
        body, headers = _binary_request(samples[i : i + 1], parameters={"binary_data_output": True})
        response = requests.post(f"{url}/v2/models/{NAME}/infer", data=body, headers=headers)
        assert response.status_code == 200, response.text
        start = int(response.headers[HEADER_LENGTH])
        return np.frombuffer(response.content[start : start + 8], "<f4").reshape(1, 2)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    # Rows may run in batches of other sizes than the reference: same model, float32 rounding.
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-5, atol=1e-5)


def test_metrics_expose_requests_batches_and_the_served_version(
    url: str, backend: TestBackend, served: Served, features: np.ndarray
) -> None:
    backend.metrics.on_swap(served)
    requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features))
    response = requests.get(f"{url}/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    assert 'heimdall_requests_total{code="200",route="/v2/models/{name}/infer"}' in text
    for name in (
        "heimdall_request_seconds_bucket",
        "heimdall_batch_samples_bucket",
        "heimdall_queue_samples",
        "heimdall_swaps_total",
        f'heimdall_served_model{{alias="production",sha256="{served.sha256}",version="3"}} 1.0',
    ):
        assert name in text


def _signed(body: bytes, secret: str = SECRET, sent: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if sent is None else sent))
    return {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: "d-1",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(body, secret, "d-1", timestamp),
    }


def _alias_event(name: str = NAME, alias: str = "production") -> bytes:
    data = {"name": name, "alias": alias, "version": "4"}
    return json.dumps({"entity": "model_version_alias", "action": "created", "data": data}).encode()


def test_a_signed_alias_event_for_the_served_alias_notifies_the_backend(
    url: str, backend: TestBackend
) -> None:
    hook = f"{url}/v2/webhooks/mlflow"
    body = _alias_event()
    response = requests.post(hook, data=body, headers=_signed(body))
    assert response.json() == {"status": "notified"}
    assert backend.notified == [(NAME, "production")]
    other = _alias_event(alias="staging")
    assert requests.post(hook, data=other, headers=_signed(other)).json() == {"status": "ignored"}
    assert backend.notified == [(NAME, "production")]


def test_unsigned_wrong_or_stale_deliveries_are_refused_and_counted(
    url: str, backend: TestBackend
) -> None:
    hook = f"{url}/v2/webhooks/mlflow"
    body = _alias_event()
    assert "unsigned" in _error(requests.post(hook, data=body), 401)
    assert "wrong" in _error(requests.post(hook, data=body, headers=_signed(body, "guess")), 401)
    stale = _signed(body, sent=time.time() - 3600)
    assert SECRET not in _error(requests.post(hook, data=body, headers=stale), 401)
    assert backend.notified == []
    registry = backend.metrics.registry
    for outcome in ("unsigned", "bad_signature", "stale"):
        count = registry.get_sample_value("heimdall_webhook_deliveries_total", {"outcome": outcome})
        assert count is not None and count >= 1


def test_the_webhook_route_is_absent_without_a_secret(url: str, backend: TestBackend) -> None:
    backend.webhook_secret = None
    body = _alias_event()
    assert "HEIMDALL_WEBHOOK_SECRET" in _error(
        requests.post(f"{url}/v2/webhooks/mlflow", data=body, headers=_signed(body)), 404
    )


def test_bodies_in_flight_are_bounded_and_released() -> None:
    in_flight = _InFlight(budget=100)
    with in_flight.reserve(60):
        with (
            pytest.raises(Overloaded, match="60 bytes of requests in progress"),
            in_flight.reserve(41),
        ):
            pass
        with in_flight.reserve(40):
            assert in_flight.used == 100
    assert in_flight.used == 0


class _OutOfMemory:
    """A session that cannot allocate: ONNX Runtime's bad_alloc on every run."""

    def __init__(self, session: object) -> None:
        self._session = session

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run(self, *_args: object) -> None:
        raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")


def test_running_out_of_memory_is_503_with_retry_after_not_bad_input(
    url: str, backend: TestBackend, model: LocalizationModel, features: np.ndarray
) -> None:
    starved = LocalizationModel(_OutOfMemory(model.session), uri="m.onnx", sha256=model.sha256)  # type: ignore[arg-type]
    backend.served = Served(starved, NAME, "3", model.sha256, "production", "models:/x@production")

    response = requests.post(f"{url}/v2/models/{NAME}/infer", json=_json_request(features))

    assert "ran out of memory" in _error(response, 503)
    assert int(response.headers["Retry-After"]) >= 1


def test_a_header_length_in_non_ascii_digits_is_a_400_line(url: str, features: np.ndarray) -> None:
    body, _ = _binary_request(features[:1])
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    connection.putrequest("POST", f"/v2/models/{NAME}/infer")
    connection.putheader(HEADER_LENGTH, "\u00b2")  # '²': str.isdigit() says yes, int() says no
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()

    assert response.status == 400
    error = json.loads(response.read())["error"]
    assert HEADER_LENGTH in error and "\n" not in error
    connection.close()


def test_a_json_body_reserves_its_decoding_cost_in_the_in_flight_budget(
    served: Served, features: np.ndarray
) -> None:
    backend = TestBackend()
    backend.served = served
    app = create_app(backend)
    body = json.dumps(_json_request(features[:1])).encode()
    raw, headers = _binary_request(features[:1])
    # Room for several times the JSON body, but not for what decoding it costs.
    app.state.in_flight = _InFlight(in_flight_budget(LIMITS))
    app.state.in_flight.used = app.state.in_flight.budget - 4 * len(body)
    with serving(app) as base:
        as_json = requests.post(
            f"{base}/v2/models/{NAME}/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        as_binary = requests.post(f"{base}/v2/models/{NAME}/infer", data=raw, headers=headers)

    assert "busy" in _error(as_json, 503)
    assert as_binary.status_code == 200, as_binary.text
    assert JSON_DECODE_FACTOR * len(body) > 4 * len(body) > len(raw)
