"""Calling a fleet of replicas: the shipped gRPC service config, static fleet targets and the stream retry policy."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from sdserve.errors import SdserveError
from sdserve.types import Retrying
from sdserve.v1 import diffusion_pb2 as pb

SERVICE: Final = "sdserve.v1.DiffusionService"

# Round robin over every address the target resolves to, and channel retries of UNAVAILABLE. gRPC retries a call
# only until it is committed: once response headers arrive (sdserve sends them with the `queued` event, at once), a
# stream that fails is the caller's to retry (RetryPolicy below does it). What the channel retries is what never
# reached a replica or was refused before it began: a connection that failed, a replica that died or is draining.
# retryThrottling stops the channel's retries while most calls fail (an outage), so retries never pile onto one.
SERVICE_CONFIG: Final[Mapping[str, Any]] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

# The seeds the retry helper picks are 32-bit (the server's own are 63-bit): they survive a JavaScript number and
# the 32-bit seed fields of other image tools, so a seed copied from a result reproduces the image anywhere.
_SEED_BITS = 32


def service_config_json(config: Mapping[str, Any] = SERVICE_CONFIG) -> str:
    """A service config as the JSON text gRPC takes (Python's `grpc.service_config` channel option, Go's
    `grpc.WithDefaultServiceConfig`)."""
    return json.dumps(config, separators=(",", ":"))


def service_config_options(config: Mapping[str, Any]) -> list[tuple[str, int | str]]:
    """Channel options that apply `config` (it stands unless the name resolver returns one) with retries on."""
    return [("grpc.service_config", service_config_json(config)), ("grpc.enable_retries", 1)]


def fleet_target(addresses: Sequence[str]) -> str:
    """A gRPC target naming a fixed list of replicas, e.g. ["10.0.0.1:50051", "10.0.0.2:50051"] ->
    "ipv4:10.0.0.1:50051,10.0.0.2:50051" (IPv6 as "[::1]:50051" -> "ipv6:..."). Balance over a DNS name that
    resolves to several addresses (a headless Service) with "dns:///NAME:PORT" instead. ValueError for anything else.
    """
    if not addresses:
        raise ValueError("fleet_target: give at least one HOST:PORT address")
    families = set()
    for address in addresses:
        host, sep, port = address.strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"fleet_target: {address!r} is not IP:PORT")
        try:
            ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        except ValueError:
            raise ValueError(
                f"fleet_target: {address!r} is not an IP address; use dns:///{address} for a name that resolves to "
                "every replica"
            ) from None
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError("fleet_target: the addresses mix IPv4 and IPv6; a target is one or the other")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:{','.join(a.strip() for a in addresses)}"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How Client(retry=...) retries a Generate, Edit or Inpaint stream that failed after it was sent.

    Before the first attempt the client fixes the request's id (a random one if none was given) and seed (a random
    32-bit one if none was given), and every attempt sends both: a retry on another replica makes the same image
    (see docs/fleet.md). Retried: UNAVAILABLE (the replica died, was drained, or the connection broke), whether or
    not the stream had started; with `retry_overloaded`, RESOURCE_EXHAUSTED that carries the server's retry hint
    (its queue is full, or the request did not fit in device memory), after at least that hint. Never retried:
    anything else, a stream that already delivered its result, and a call the caller cancelled. The waits grow from
    `initial_backoff` by `multiplier` up to `max_backoff` seconds, each drawn at random from 0 to that bound
    (gRPC's jitter); a call's `timeout` bounds all attempts together.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_overloaded: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts: must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("RetryPolicy: needs 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier: must be at least 1, got {self.multiplier}")

    def retryable(self, error: SdserveError) -> bool:
        """Whether a failure with this status may go again (the attempt count aside)."""
        if error.code == "UNAVAILABLE":
            return True
        return self.retry_overloaded and error.code == "RESOURCE_EXHAUSTED" and error.retry_after_seconds is not None

    def delay(self, error: SdserveError, attempt: int) -> float | None:
        """Seconds to wait before the attempt after `attempt` (from 1) failed with `error`; None: do not retry."""
        if attempt >= self.max_attempts or not self.retryable(error):
            return None
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        wait = random.uniform(0.0, bound)
        return max(wait, error.retry_after_seconds or 0.0)


def fix_identity(params: pb.GenerationParams) -> tuple[str, int]:
    """Gives `params` a request id and a seed where it has none, so every attempt sends the same ones; returns
    them."""
    if not params.request_id:
        params.request_id = uuid.uuid4().hex
    if not params.HasField("seed"):
        params.seed = secrets.randbits(_SEED_BITS)
    return params.request_id, params.seed


@dataclasses.dataclass
class Attempts:
    """What a retrying stream (sdserve.client.RetryingStream, sdserve.aio.AsyncRetryingStream) keeps across its
    attempts: how to start one (`open(timeout)`), the policy, the deadline of them all (time.monotonic(); None:
    none) and the request id and seed every attempt sends."""

    open: Callable[[float | None], Any]
    policy: RetryPolicy
    deadline: float | None
    identity: tuple[str, int]

    @classmethod
    def of_call(
        cls,
        rpc: Callable[..., Any],
        req: Any,
        params: pb.GenerationParams,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
        policy: RetryPolicy,
    ) -> Attempts:
        """The attempts of `rpc(req)`: `params` gets its request id and seed first (fix_identity), and `timeout`
        bounds every attempt together."""
        identity = fix_identity(params)
        deadline = None if timeout is None else time.monotonic() + timeout
        return cls(lambda left: rpc(req, timeout=left, metadata=metadata), policy, deadline, identity)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def start(self) -> Any:
        """The call of the next attempt, with what is left of the deadline."""
        return self.open(self.remaining())

    def next_retry(self, error: SdserveError, attempt: int, replica: str | None, cancelled: bool) -> Retrying:
        """The Retrying event between attempt `attempt` (which failed with `error`, on `replica` if it had started:
        None if not) and the next one, whose `delay_seconds` the stream waits; raises `error` when there is no next
        one: cancelled, not retryable, attempts used up, or the wait would outlast the deadline."""
        delay = self.policy.delay(error, attempt)
        remaining = self.remaining()
        if cancelled or delay is None or (remaining is not None and remaining <= delay):
            raise error from None
        request_id, seed = self.identity
        return Retrying(
            attempt=attempt,
            max_attempts=self.policy.max_attempts,
            code=error.code,
            message=error.message,
            started=replica is not None,
            replica=replica or "",
            delay_seconds=delay,
            request_id=request_id,
            seed=seed,
        )
