"""
Measure what taskmesh adds on top of its baselines, as ratios from one run.

Each case times taskmesh's code path and a baseline path on the same input in
the same process, interleaved over several rounds, and prints the ratio of the
medians. Absolute times depend on the machine; the ratios are what to compare
between versions.

    python benchmarks/bench_overhead.py [--messages N] [--rounds R]

Cases:
  parse     StompClientProtocol.dataReceived on MESSAGE frames, against
            stompest's StompParser alone on the same bytes.
  envelope  encode + seal (Ed25519 signature) + open + decode of a task,
            against encode + decode without signing.
  encrypt   the same with AES-256-GCM payload encryption as well, against
            signing only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from stompest.protocol import StompParser  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from taskmesh._messages import TaskMessage, decode, encode  # noqa: E402
from taskmesh.security import (  # noqa: E402
    PayloadCipher,
    Signer,
    SymmetricKey,
    TrustedKey,
    Verifier,
    key_id_of,
    open_message,
    seal_message,
)
from taskmesh.stomp import StompClientProtocol, StompSettings  # noqa: E402

REQUEST_ID = "0b5c8a5e-8d0f-4a59-9a2c-0e8f0f2f3c11"


def message_frames(count: int) -> bytes:
    body = b'{"task":"sleep","args":{"seconds":3}}'
    frame = (
        b"MESSAGE\ndestination:/topic/myapp.tasks\nmessage-id:ID\\cvm-1\\c1\nsubscription:s1\n"
        b"taskmesh-type:task\nrequest_id:" + REQUEST_ID.encode() + b"\ncontent-length:"
        + str(len(body)).encode() + b"\n\n" + body + b"\x00"
    )
    return frame * count


def time_once(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def compare(name: str, measured: Callable[[], object], baseline: Callable[[], object], rounds: int, count: int) -> None:
    measured_times, baseline_times = [], []
    for _ in range(rounds):
        baseline_times.append(time_once(baseline))
        measured_times.append(time_once(measured))
    measured_median = statistics.median(measured_times)
    baseline_median = statistics.median(baseline_times)
    print(
        f"{name:9} {count / measured_median:12,.0f} msg/s  baseline {count / baseline_median:12,.0f} msg/s"
        f"  ratio {measured_median / baseline_median:6.2f}x"
    )


def parse_case(count: int) -> tuple[Callable[[], object], Callable[[], object]]:
    data = message_frames(count)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]

    def protocol_path() -> None:
        protocol = StompClientProtocol(StompSettings(heart_beat=(0, 0)), Clock(), "broker")
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"CONNECTED\nversion:1.2\n\n\x00")
        protocol.subscribe("/topic/myapp.tasks", "s1", lambda message: None, receipt=False)
        for chunk in chunks:
            protocol.dataReceived(chunk)

    def parser_path() -> None:
        parser = StompParser("1.2")
        for chunk in chunks:
            parser.add(chunk)
            while parser.canRead():
                parser.get()

    return protocol_path, parser_path


def envelope_cases(count: int) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    clock = Clock()
    clock.advance(time.time())
    private = Ed25519PrivateKey.generate()
    key_id = key_id_of(private.public_key())
    signer = Signer(private, key_id, clock)
    cipher = PayloadCipher(SymmetricKey(os.urandom(32), "0123456789abcdef"))
    task = TaskMessage(REQUEST_ID, "sleep", {"seconds": 3}, "/queue/myapp.reply")
    destination = "/topic/myapp.tasks"

    def plain() -> None:
        for _ in range(count):
            headers, body = encode(task)
            decode(headers, body)

    def signed(with_cipher: PayloadCipher | None) -> Callable[[], None]:
        def run() -> None:
            # A fresh verifier per round keeps the replay cache from growing
            # across rounds.
            verifier = Verifier({key_id: TrustedKey(private.public_key())}, clock)
            for _ in range(count):
                headers, body = encode(task)
                headers, body = seal_message(headers, body, destination, signer, with_cipher)
                opened = open_message(headers, body, destination, verifier, with_cipher)
                decode(opened.headers, opened.body)

        return run

    return [
        ("envelope", signed(None), plain),
        ("encrypt", signed(cipher), signed(None)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="messages per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (default 5)")
    options = parser.parse_args(argv)
    print(f"{options.messages} messages per round, median of {options.rounds} rounds, Python {sys.version.split()[0]}")
    compare("parse", *parse_case(options.messages), options.rounds, options.messages)
    envelope_count = max(options.messages // 5, 1)
    for name, measured, baseline in envelope_cases(envelope_count):
        compare(name, measured, baseline, options.rounds, envelope_count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
