"""Seeded synthetic RF data: emitters in a region heard by fixed WebSDR-like receivers.

Each sample is one emitter at a random position with a random transmit power. Every
receiver gets ``P_rx = P_tx - PL(d) + shadowing`` (log-distance path loss), an IQ stream of
a narrowband FM carrier at that power plus complex white noise, and a log-mel spectrogram of
16 mel bands × 32 frames. The 8 receivers' bands are stacked along the frequency axis to
make 128 rows. The three channels of a feature ``(3, 128, 32)`` float32 are:

0. log-mel power in dB relative to the noise power of one FFT bin, divided by 20;
1. latitude of the station that heard each row, normalized to the region (-1..1);
2. longitude of that station, normalized the same way.

Channels 1 and 2 tell a translation-equivariant network which station each block of rows
belongs to, as real localization front-ends feed receiver positions alongside the spectra.

Labels are the emitter's ``[lat, lon]`` in degrees. The same seed gives identical arrays, and
a shorter call is a prefix of a longer one with the same seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

EARTH_RADIUS_KM = 6371.0088
N_BANDS = 16
N_FRAMES = 32
N_FFT = 256
HOP = 64
_CHUNK = 256  # samples drawn per sub-seed, so a shorter call is a prefix of a longer one
_BLOCK = 16  # samples whose signals are computed together within a chunk
# Bumped whenever the same seed would give other samples: held-out sets are named by it.
GENERATOR_VERSION = 1
# The seed of the held-out set every candidate is judged on (training never draws it).
HELDOUT_SEED = 917_401
# Memory per sample while ``generate`` runs: its chunks and their concatenation (features
# (3, 128, 32) and labels (2,), float32) are held at once, two copies.
SAMPLE_BYTES = 2 * (3 * 128 * 32 + 2) * 4

# Eight receivers around the region (approximate positions of NW-Italian cities).
DEFAULT_RECEIVERS: tuple[tuple[float, float], ...] = (
    (45.07, 7.69),
    (45.46, 9.19),
    (44.41, 8.93),
    (45.74, 7.32),
    (44.39, 7.55),
    (44.91, 8.61),
    (45.45, 8.62),
    (44.31, 8.48),
)


@dataclass(frozen=True)
class RFScenario:
    """Region, receivers and propagation parameters of the synthetic world."""

    lat_range: tuple[float, float] = (44.0, 46.0)
    lon_range: tuple[float, float] = (7.0, 10.0)
    receivers: tuple[tuple[float, float], ...] = DEFAULT_RECEIVERS
    path_loss_exponent: float = 2.8
    reference_loss_db: float = 40.0
    shadowing_db: float = 2.0
    tx_power_dbm: tuple[float, float] = (10.0, 20.0)
    noise_floor_dbm: float = -110.0

    def __post_init__(self) -> None:
        if len(self.receivers) * N_BANDS != 128:
            raise ValueError("the feature layout needs exactly 8 receivers (8 × 16 mel bands)")
        if self.lat_range[0] >= self.lat_range[1] or self.lon_range[0] >= self.lon_range[1]:
            raise ValueError("region ranges must be (min, max) with min < max")

    @property
    def center(self) -> tuple[float, float]:
        return (sum(self.lat_range) / 2, sum(self.lon_range) / 2)

    @property
    def scale(self) -> tuple[float, float]:
        return (
            (self.lat_range[1] - self.lat_range[0]) / 2,
            (self.lon_range[1] - self.lon_range[0]) / 2,
        )


def haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle distance in km between ``[..., (lat, lon)]`` arrays in degrees."""
    lat1, lon1 = np.radians(a[..., 0]), np.radians(a[..., 1])
    lat2, lon2 = np.radians(b[..., 0]), np.radians(b[..., 1])
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def _mel_filterbank() -> np.ndarray:
    """Triangular filters, mel-spaced over the FFT bins of the baseband IQ (N_BANDS × N_FFT)."""
    hz = np.linspace(0.0, 8000.0, N_FFT)
    mel = 2595.0 * np.log10(1.0 + hz / 700.0)
    edges = np.linspace(mel[0], mel[-1], N_BANDS + 2)
    bank = np.zeros((N_BANDS, N_FFT))
    for i in range(N_BANDS):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        bank[i] = np.clip(np.minimum((mel - lo) / (mid - lo), (hi - mel) / (hi - mid)), 0.0, None)
    return bank / bank.sum(axis=1, keepdims=True)


_FILTERBANK = _mel_filterbank()
_WINDOW = np.hanning(N_FFT)


def _chunk(rng: np.random.Generator, scenario: RFScenario, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples of the chunk that ``rng`` draws, whatever ``n`` is.

    Every per-sample parameter is drawn for a full chunk and then sliced, and the noise,
    the one draw too large to make for samples nobody asked for, comes last in a single
    sample-major call: numpy fills it in order, so its first ``n`` samples do not depend
    on ``n`` either.
    """
    receivers = np.asarray(scenario.receivers)
    lat = rng.uniform(*scenario.lat_range, size=_CHUNK)[:n]
    lon = rng.uniform(*scenario.lon_range, size=_CHUNK)[:n]
    tx = rng.uniform(*scenario.tx_power_dbm, size=(_CHUNK, 1))[:n]
    shadowing = rng.normal(0.0, scenario.shadowing_db, size=(_CHUNK, len(receivers)))[:n]
    carrier = rng.uniform(0.05, 0.95, size=(_CHUNK, 1, 1))[:n]  # cycles/sample, one emitter
    deviation = rng.uniform(0.002, 0.02, size=(_CHUNK, 1, 1))[:n]
    rate = rng.uniform(0.001, 0.01, size=(_CHUNK, 1, 1))[:n]
    length = HOP * (N_FRAMES - 1) + N_FFT
    noise = rng.standard_normal((n, len(receivers), length, 2))

    positions = np.stack([lat, lon], axis=1)
    dist = np.maximum(haversine_km(positions[:, None, :], receivers[None, :, :]), 0.1)
    rx = (
        tx
        - scenario.reference_loss_db
        - 10 * scenario.path_loss_exponent * np.log10(dist)
        + shadowing
    )
    snr_db = rx - scenario.noise_floor_dbm  # (n, receivers)

    t = np.arange(length)
    amplitude = 10 ** (snr_db[..., None] / 20)
    # The same values as (noise[..., 0] + 1j * noise[..., 1]) / sqrt(2), computed in place.
    noise *= 1.0 / np.sqrt(2)
    iq_all = noise.view(np.complex128)[..., 0]
    mel = np.empty((n, len(receivers), N_BANDS, N_FRAMES))
    # Per block of samples the temporaries stay a few MB, where the whole chunk's would be
    # hundreds: the same numbers (every step is per sample), several times faster.
    for start in range(0, n, _BLOCK):
        b = slice(start, start + _BLOCK)
        modulation = np.sin(2 * np.pi * rate[b] * t)
        phase = 2 * np.pi * np.cumsum(carrier[b] + deviation[b] * modulation, axis=-1)
        iq = iq_all[b]
        iq += amplitude[b] * np.exp(1j * phase)
        frames = np.lib.stride_tricks.sliding_window_view(iq, N_FFT, axis=-1)[..., ::HOP, :]
        power = np.abs(np.fft.fft(frames * _WINDOW, axis=-1)) ** 2 / N_FFT
        mel[b] = np.einsum("nrtf,bf->nrbt", power, _FILTERBANK)  # (block, receivers, bands, frames)
    log_mel = (10 * np.log10(mel + 1e-6)) / 20.0
    log_mel = log_mel.reshape(n, -1, N_FRAMES)  # receivers stacked → 128 rows
    station = (receivers - np.asarray(scenario.center)) / np.asarray(scenario.scale)
    station_map = np.repeat(station, N_BANDS, axis=0)  # (128, 2): the station of each row
    coords = np.broadcast_to(station_map.T[None, :, :, None], (n, 2, log_mel.shape[1], N_FRAMES))
    features = np.concatenate([log_mel[:, None], coords], axis=1).astype(np.float32)
    return features, positions.astype(np.float32)


def generate(
    n: int, seed: int = 0, scenario: RFScenario | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features (n, 3, 128, 32) float32, labels (n, 2) float32 [lat, lon])``.

    Chunks are computed on ``workers`` threads (default: one per CPU; numpy releases the GIL
    in the heavy steps); each chunk has its own sub-seed, so the arrays do not depend on it.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    scenario = scenario or RFScenario()
    children = np.random.SeedSequence(seed).spawn((n + _CHUNK - 1) // _CHUNK)
    sizes = [min(_CHUNK, n - i * _CHUNK) for i in range(len(children))]

    def chunk(i: int) -> tuple[np.ndarray, np.ndarray]:
        return _chunk(np.random.default_rng(children[i]), scenario, sizes[i])

    threads = min(len(children), workers or os.cpu_count() or 1)
    if threads == 1:
        parts = [chunk(i) for i in range(len(children))]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="heimdall-data") as pool:
            parts = list(pool.map(chunk, range(len(children))))
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
