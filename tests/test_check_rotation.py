"""`keyconnector check` agrees with `serve` in the middle of a key-pair rotation (issue 13).

After `rotate-key-pair` from pair A to pair B (without `--retire-old`), ApplicationDatas still holds
only A's wrap of the data key: B's wrap lives in the key ring alone. `serve` with B loads the data key
from the ring; `check` used to unwrap ApplicationDatas itself and so failed with B's settings ("wrapped
by another one") while `serve` with the same settings served every user. Both are run here on a real
deployment, with each pair's settings, so that the two can never disagree again unnoticed.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from keyconnector.cli import main
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx
from tests.conftest import Pfx, Service
from tests.support.backends import make_backend
from tests.test_rotate import Deployment, check_through_service, deployment, new_pair_settings, run, seed


@pytest.fixture(scope="module")
def pfx_b(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    path = tmp_path_factory.mktemp("pfx-b") / "b.pfx"
    path.write_bytes(self_signed_pfx("pair-b-password", bits=2048))
    return Pfx(path, "pair-b-password")


def check_lines(capsys: pytest.CaptureFixture[str], site: Deployment) -> tuple[int, list[str]]:
    """`keyconnector check` with ``site``'s settings: its exit code and output lines."""
    capsys.readouterr()
    code = main(["check", "--config", str(site.config)])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def assert_check_passes(capsys: pytest.CaptureFixture[str], site: Deployment, which: str) -> None:
    code, lines = check_lines(capsys, site)
    shown = "\n".join(lines)
    assert code == 0, f"check with pair {which} failed:\n{shown}"
    assert not [line for line in lines if line.startswith("FAIL")], shown
    data_key = [line for line in lines if line.startswith("ok   data key: ")]
    assert len(data_key) == 1 and "version(s) 1 unwrap with this key pair" in data_key[0], shown
    ring = [line for line in lines if line.startswith("ok   key ring: ")]
    assert len(ring) == 1 and "authenticates" in ring[0], shown


@pytest.mark.parametrize("name", ["sqlite", "postgresql"])
def test_check_agrees_with_serve_during_a_key_pair_rotation(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    pfx_b: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = make_backend(name, tmp_path, request)
    pair_a = deployment(backend, issuer, pfx, "pair-a")
    pair_b = deployment(backend, issuer, pfx_b, "pair-b", **new_pair_settings(pfx_b))
    keys: dict[uuid.UUID, bytes] = run(seed(pair_a.settings, 40))

    capsys.readouterr()
    rotation = ["rotate-key-pair", "--config", str(pair_a.config), "--target-config", str(pair_b.config)]
    assert main(rotation) == 0
    assert "now also wrapped by" in capsys.readouterr().out

    # The instances already switched to pair B: check says what serve does.
    assert_check_passes(capsys, pair_b, "B")
    service_b: Service = start_service(pair_b.env)
    check_through_service(service_b, issuer, keys)
    service_b.stop()

    # The instances not yet switched (pair A): both still work as well.
    assert_check_passes(capsys, pair_a, "A")
    service_a: Service = start_service(pair_a.env)
    check_through_service(service_a, issuer, keys)
