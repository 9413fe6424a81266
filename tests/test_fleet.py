"""Three replicas on loopback (a server and a sidecar each, separate stores, one declared state from a local Hub)
behind one balanced, retrying client: an alias change under load and a replica killed under load (docs/fleet.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Unpack

import grpc
import numpy as np
import pytest

from sdserve import AsyncClient, Client, Result, Retrying, SdserveError, Started
from sdserve.fleet import SERVICE_CONFIG, RetryPolicy, fleet_target, service_config_json
from sdserve.types import Event, GenerationOptions
from service.tiny import build_tiny
from tests.fleet_harness import Fleet, write_declared
from tests.harness import pixels, wait_until
from tests.model_manager.harness import hub_files
from tests.model_manager.hubserver import HubServer
from tests.scripted_server import Step, scripted

REPO = Path(__file__).resolve().parent.parent
# Two tiny models (different weights: the same seed makes different images) as two Hub repositories.
MODELS = {"a": "sdserve-test/fleet-a", "b": "sdserve-test/fleet-b"}
PROMPT = "a fleet of small boats"
SIZE = 64
# The bound this test holds an alias change to; docs/fleet.md states what it measured.
CONVERGENCE_BOUND_SECONDS = 60.0
# Retries without waiting, for the scripted server.
FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.01)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three replicas reconciling `default -> a` (a and b declared) from a local Hub, serving once `default` is."""
    root = tmp_path_factory.mktemp("fleet")
    hub = HubServer()
    for seed, (name, repo) in enumerate(MODELS.items()):
        build_tiny(root / "models" / name, seed=seed)
        hub.repo(repo).add_commit(hub_files(root / "models" / name, with_fp16=False))
    declared = root / "declared.yaml"
    write_declared(declared, MODELS, {"default": "a"})
    fleet = Fleet(root, hub, declared, size=3)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
        hub.stop()


def balanced(fleet: Fleet) -> Client:
    """A client over every replica: round robin, channel retries, and the stream retry helper."""
    return Client(fleet.target, service_config=SERVICE_CONFIG, retry=RetryPolicy(max_attempts=4, max_backoff=1.0))


def settle(read: Callable[[], float], want: float, timeout: float = 30.0) -> float:
    """Polls `read` until it equals `want` (the server accounts for a call just after its stream ends) or the time
    is up; returns the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != want and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


@dataclasses.dataclass
class Call:
    """One request as the client saw it: every event of every attempt, its outcome, and when it was sent."""

    sent: float
    events: list[tuple[float, Event]] = dataclasses.field(default_factory=list)
    result: Result | None = None
    error: SdserveError | None = None

    @property
    def started(self) -> list[Started]:
        return [ev for _, ev in self.events if isinstance(ev, Started)]

    @property
    def retries(self) -> list[Retrying]:
        return [ev for _, ev in self.events if isinstance(ev, Retrying)]

    @property
    def done(self) -> Result:
        """The result (for calls a test has checked have one)."""
        assert self.result is not None, self.error
        return self.result

    def first_started_at(self) -> float:
        return next(t for t, ev in self.events if isinstance(ev, Started))


def run_call(
    client: Client,
    call: Call | None = None,
    on_event: Callable[[Event], None] = lambda ev: None,
    **options: Unpack[GenerationOptions],
) -> Call:
    """One Generate through the retry helper, up to its result (leaving the stream there is not a cancel), recorded
    in `call` (made just before the RPC starts, so `call.sent` is when it was sent)."""
    call = call or Call(sent=time.monotonic())
    try:
        with client.stream_generate(PROMPT, timeout=120, **options) as stream:
            for ev in stream:
                call.events.append((time.monotonic(), ev))
                on_event(ev)
                if isinstance(ev, Result):
                    call.result = ev
                    break
    except SdserveError as err:
        call.error = err
    return call


def failures(calls: list[Call], fleet: Fleet) -> str:
    bad = [f"{c.error}" for c in calls if c.result is None]
    return f"{len(bad)} calls failed: {bad[:5]}\n{fleet.logs()}" if bad else ""


# ---- the client's pieces -----------------------------------------------------------------------------------------


def test_the_shipped_service_config_and_fleet_targets() -> None:
    config = json.loads(service_config_json())
    documented = re.search(r"```json\n(.*?)```", (REPO / "docs" / "fleet.md").read_text(), re.S)
    assert documented is not None and json.loads(documented[1]) == config, "docs/fleet.md shows another config"
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "sdserve.v1.DiffusionService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert fleet_target(["10.0.0.1:50051", " 10.0.0.2:50051"]) == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert fleet_target(["[::1]:1", "[::2]:2"]) == "ipv6:[::1]:1,[::2]:2"
    for bad, says in (
        (["sdserve-0:50051"], "dns:///sdserve-0:50051"),
        (["10.0.0.1"], "not IP:PORT"),
        (["10.0.0.1:1", "[::1]:1"], "mix IPv4 and IPv6"),
        ([], "at least one"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            fleet_target(bad)
    with pytest.raises(ValueError, match="given channel"):
        Client(channel=grpc.insecure_channel("127.0.0.1:1"), service_config=SERVICE_CONFIG)


def test_the_retry_policy_retries_only_what_is_safe() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.5, max_backoff=0.8, retry_overloaded=True)
    unavailable = SdserveError("UNAVAILABLE", "the server is draining; retry on another replica")
    for attempt, bound in ((1, 0.5), (2, 0.8)):
        delay = policy.delay(unavailable, attempt)
        assert delay is not None and 0 <= delay <= bound
    assert policy.delay(unavailable, 3) is None, "max_attempts counts every attempt"
    queue_full = SdserveError("RESOURCE_EXHAUSTED", "queue full: 32 waiting", retry_after_seconds=1.0)
    assert policy.delay(queue_full, 1) == 1.0, "a retry hint is waited out"
    assert RetryPolicy().delay(queue_full, 1) is None, "RESOURCE_EXHAUSTED is retried only when asked for"
    assert policy.delay(SdserveError("RESOURCE_EXHAUSTED", "no hint"), 1) is None
    for code in ("INVALID_ARGUMENT", "INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED", "NOT_FOUND"):
        assert policy.delay(SdserveError(code, ""), 1) is None, code
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_the_helper_retries_a_started_stream_with_its_request_id_and_seed() -> None:
    lost = Step(("queued", "started"), replica="r1", code=grpc.StatusCode.UNAVAILABLE, message="replica went away")
    with (
        scripted(lost, Step(("queued", "started", "result"), replica="r2")) as (target, server),
        Client(target, retry=FAST) as client,
    ):
        events = list(client.stream_generate(PROMPT, steps=1))
    assert [type(e).__name__ for e in events] == ["Queued", "Started", "Retrying", "Queued", "Started", "Result"]
    (request_id, seed), again = server.seen
    assert again == (request_id, seed) and re.fullmatch("[0-9a-f]{32}", request_id)
    assert seed is not None and 0 <= seed < 2**32
    retrying, result = events[2], events[-1]
    assert isinstance(retrying, Retrying) and isinstance(result, Result)
    assert (retrying.attempt, retrying.code, retrying.started, retrying.replica) == (1, "UNAVAILABLE", True, "r1")
    assert (retrying.request_id, retrying.seed) == (request_id, seed)
    assert (result.replica, result.request_id, result.image.seed) == ("r2", request_id, seed)

    # The caller's own id and seed are the ones sent; without `retry=` nothing is fixed or retried (as before).
    with scripted(lost, Step(("queued", "started", "result"))) as (target, server), Client(target, retry=FAST) as c:
        assert c.generate(PROMPT, request_id="mine", seed=7).request_id == "mine"
        assert server.seen == [("mine", 7), ("mine", 7)]
    with scripted(lost) as (target, server), Client(target) as plain:
        with pytest.raises(SdserveError, match="UNAVAILABLE"):
            plain.generate(PROMPT)
        assert server.seen == [("", None)]


def test_the_helper_leaves_alone_what_it_must_not_retry() -> None:
    after_result = Step(("queued", "started", "result"), code=grpc.StatusCode.UNAVAILABLE)
    invalid = Step((), code=grpc.StatusCode.INVALID_ARGUMENT, message="params.width: too large")
    unavailable = Step(("queued",), code=grpc.StatusCode.UNAVAILABLE)
    full = Step((), code=grpc.StatusCode.RESOURCE_EXHAUSTED, message="queue full", retry_after=30)
    cases: list[tuple[tuple[Step, ...], RetryPolicy, str, int]] = [
        ((after_result,), FAST, "", 1),  # delivered: the result is returned, the stream's end is not retried
        ((invalid,), FAST, "INVALID_ARGUMENT", 1),
        ((unavailable,) * 3, dataclasses.replace(FAST, max_attempts=3), "UNAVAILABLE", 3),
        ((full,), dataclasses.replace(FAST, retry_overloaded=True), "RESOURCE_EXHAUSTED", 1),  # the hint > timeout
    ]
    for script, policy, code, attempts in cases:
        with scripted(*script) as (target, server), Client(target, retry=policy) as client:
            try:
                assert client.generate(PROMPT, timeout=10).replica == "scripted" and not code
            except SdserveError as err:
                assert err.code == code, err
            assert len(server.seen) == attempts, (script, server.seen)


def test_the_async_helper_retries_a_started_stream_alike() -> None:
    lost = Step(("queued", "started"), replica="r1", code=grpc.StatusCode.UNAVAILABLE)

    async def run(target: str) -> list[Event]:
        async with AsyncClient(target, retry=FAST) as client:
            return [ev async for ev in client.stream_generate(PROMPT, steps=1)]

    with scripted(lost, Step(("queued", "started", "result"), replica="r2")) as (target, server):
        events = asyncio.run(run(target))
    assert [type(e).__name__ for e in events] == ["Queued", "Started", "Retrying", "Queued", "Started", "Result"]
    assert server.seen[0] == server.seen[1] and isinstance(events[-1], Result) and events[-1].replica == "r2"


# ---- the fleet -----------------------------------------------------------------------------------------------------


def test_an_alias_change_under_load_fails_nothing_and_every_replica_converges(fleet: Fleet) -> None:
    """Re-pointing `default` in the declared state while requests run: none fails (nor needs a retry), each names
    the model that served it (its image is that model's), and every replica moves within the bound."""
    fleet.heal()
    old = json.loads(fleet.declared.read_text())["aliases"]["default"]
    new = next(name for name in MODELS if name != old)
    calls: list[Call] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(client: Client) -> None:
        while not stop.is_set():
            call = run_call(client, steps=4, seed=11, width=SIZE, height=SIZE)
            with lock:
                calls.append(call)

    def served(model: str, after: float = 0.0) -> dict[str, int]:
        with lock:
            done = [c for c in calls if c.result is not None and c.result.parameters["model"] == model]
        counts = dict.fromkeys((r.name for r in fleet.replicas), 0)
        for c in done:
            if c.first_started_at() > after:
                counts[c.done.replica] += 1
        return counts

    def wait(what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{failures(calls, fleet)}"
            time.sleep(0.05)

    with balanced(fleet) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(load, client) for _ in range(3)]
        try:
            wait(f"every replica to serve {old}", lambda: min(served(old).values()) >= 2, 60)
            changed_at = time.monotonic()
            write_declared(fleet.declared, MODELS, {"default": new})
            wait(f"every replica to serve {new}", lambda: min(served(new, changed_at).values()) >= 2, 120)
        finally:
            stop.set()
        for w in workers:
            w.result()

    assert not failures(calls, fleet), failures(calls, fleet)
    retried = [c.retries for c in calls if c.retries]
    assert not retried, f"a hot swap needed retries: {retried[:3]}"
    images: dict[str, np.ndarray] = {}
    for c in calls:
        result, (started,) = c.result, c.started
        assert result is not None
        model = result.parameters["model"]
        assert model in (old, new) and model == started.model and result.replica == started.replica, c
        assert result.parameters["requested_model"] == "default", result.parameters
        reference = images.setdefault(str(model), pixels(result.image.data))
        assert np.array_equal(pixels(result.image.data), reference), f"{result.request_id} is not {model}'s image"
    assert not np.array_equal(images[old], images[new]), "the two models must make different images"

    convergence: dict[str, float] = {}
    for r in fleet.replicas:
        on_r = [c for c in calls if c.done.replica == r.name]
        first_new = min(c.first_started_at() for c in on_r if c.done.parameters["model"] == new)
        convergence[r.name] = first_new - changed_at
        late = [c.done.request_id for c in on_r if c.sent > first_new and c.done.parameters["model"] != new]
        assert not late, f"{r.name} served {old} to requests sent after it served {new}: {late}"
    print(f"\nalias change: {len(calls)} requests, 0 failed; convergence per replica (s): {convergence}")
    assert max(convergence.values()) < CONVERGENCE_BOUND_SECONDS, convergence


def test_a_replica_killed_under_load_loses_no_request(fleet: Fleet) -> None:
    """kill -9 of one server while it runs a started request and holds one not started: every request ends once,
    with its image; the running stream is retried elsewhere with its request id and seed and makes the same image;
    the one that had not started is served elsewhere; the replicas' counters add up to what the client got."""
    fleet.heal()
    victim, survivors = fleet.replicas[0], fleet.replicas[1:]
    before = {r.name: r.finished() for r in survivors}
    requests, steps = 30, 20
    lock = threading.Lock()
    calls: list[Call] = []
    from_victim = 0
    frozen = threading.Event()

    def on_event(ev: Event) -> None:
        nonlocal from_victim
        with lock:
            if isinstance(ev, Result) and ev.replica == victim.name:
                from_victim += 1
            # The victim has served some requests and now starts another (`steps` steps to go; the client reacts
            # within one): stop it right there, with that stream started and unfinished.
            if isinstance(ev, Started) and ev.replica == victim.name and from_victim >= 2 and not frozen.is_set():
                victim.freeze()
                frozen.set()

    def one(client: Client) -> Call:
        with lock:
            call = Call(sent=time.monotonic())
            calls.append(call)
        return run_call(client, call, on_event, steps=steps, width=SIZE, height=SIZE)

    with (
        balanced(fleet) as client,
        balanced(fleet) as prober,
        concurrent.futures.ThreadPoolExecutor(5) as pool,
        concurrent.futures.ThreadPoolExecutor(3) as probing,
    ):
        # The prober's channel is its own and nothing else uses it: once all three replicas answered it, its round
        # robin sends each one of any three calls in a row.
        answered: set[str] = set()

        def all_answered() -> bool:
            answered.add(prober.server_info(timeout=10).replica)
            return len(answered) == len(fleet.replicas)

        wait_until(all_answered, "every replica to answer the prober")
        try:
            load = [pool.submit(one, client) for _ in range(requests)]
            assert frozen.wait(120), f"the victim never started a third request\n{fleet.logs()}"
            # A frozen server keeps its connections READY: one of three new calls goes to it and waits, not started.
            probes = [Call(sent=time.monotonic()) for _ in range(3)]
            held = [probing.submit(run_call, prober, p, steps=steps, width=SIZE, height=SIZE) for p in probes]
            wait_until(lambda: sum(1 for p in probes if p.events) >= 2, "the survivors to answer two probes")
        finally:
            killed_at = time.monotonic()
            victim.kill()
        assert [f.result() for f in load] == calls and [f.result() for f in held] == probes
    waited = [p for p in probes if p.events[0][0] > killed_at]

    # Exactly one terminal outcome per request, all of them results, each naming the replica that served it.
    everything = calls + probes
    assert len(everything) == requests + 3 and not failures(everything, fleet), failures(everything, fleet)
    results = [c.result for c in everything if c.result is not None]
    assert len({r.request_id for r in results}) == len(everything)
    for c in everything:
        assert c.result is not None
        ids = {s.request_id for s in c.started} | {r.request_id for r in c.retries} | {c.result.request_id}
        seeds = {s.seeds[0] for s in c.started} | {r.seed for r in c.retries} | {c.result.image.seed}
        assert len(ids) == 1 and len(seeds) == 1, f"an attempt changed the request id or seed: {ids} {seeds}"
        assert c.result.replica == c.started[-1].replica != "", c
    lost = [c for c in calls if any(r.started and r.replica == victim.name for r in c.retries)]
    queued = [c for c in everything if any(not r.started for r in c.retries)]
    assert len(lost) == 1, f"the stream running on the victim was not retried once: {[c.retries for c in lost]}"
    assert len(waited) == 1, f"not one probe waited on the frozen victim: {[p.events[:1] for p in probes]}"
    assert all(c.done.replica != victim.name for c in lost + queued + waited)

    # The counters: what the survivors finished, plus what the client got from the victim before it died.
    def finished() -> float:
        return sum(r.finished() - before[r.name] for r in survivors) + from_victim

    total = settle(finished, len(everything))
    assert total == len(everything), f"survivors' counters + {from_victim} from the victim = {total}"
    assert all(r.finished("unavailable") == 0 for r in survivors)

    # The same request id and seed make the same image: a retried stream's image is what a fresh call with its seed
    # makes on a survivor, and so is the image of one the victim finished (the replicas compute alike).
    check = [c.done for c in lost] + [next(r for r in results if r.replica == victim.name)]
    with Client(survivors[0].target) as single:
        for r in check:
            again = single.generate(PROMPT, width=SIZE, height=SIZE, steps=steps, seed=r.image.seed)
            assert np.array_equal(pixels(again.image.data), pixels(r.image.data)), f"{r.request_id}: not the same"
    by = "the client" if waited[0].retries else "the channel"
    print(
        f"\nkill -9 under load: {len(everything)} requests, {from_victim} finished on {victim.name} before it "
        f"froze, 1 started stream retried by the client with its id and seed, {len(queued)} queued there retried by "
        f"the client, 1 sent to it while frozen retried by {by}"
    )
