"""LOG_REDACT_PATTERNS: the syntax, the default set, streaming across chunk boundaries, the whole flow."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.document.redact import (
    CHUNK,
    CONTEXT,
    DEFAULT_PATTERNS,
    MAX_MATCH,
    PatternError,
    Redactor,
    StreamMasker,
    parse_patterns,
)
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import documents, make_env

DEFAULT = Redactor(list(parse_patterns("default")))
PRIVATE_KEY = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n" * 700
               + b"-----END OPENSSH PRIVATE KEY-----")


def test_syntax() -> None:
    assert parse_patterns("") == () and parse_patterns("  ") == () and parse_patterns("off") == ()
    assert len(parse_patterns("default")) == len(DEFAULT_PATTERNS)
    assert len(parse_patterns("DEFAULT;;default")) == len(DEFAULT_PATTERNS)  # no duplicates
    extra = parse_patterns(r"default;;password=(?P<secret>\S+);;ACME-[0-9a-f]{8}")
    assert len(extra) == len(DEFAULT_PATTERNS) + 2
    assert [p.pattern for p in parse_patterns("a=1\nb;c=2")] == [b"a=1", b"b;c=2"]  # newline-separated too
    with pytest.raises(PatternError, match="item 2 is not a valid regular expression"):
        parse_patterns("default;;[unclosed")
    with pytest.raises(PatternError, match="matches the empty string"):
        parse_patterns("x*")


def test_off_by_default_and_own_tokens_masked_when_on() -> None:
    base = {"GITLAB_URL": "https://gitlab.example.com", "GITLAB_TOKEN": "glpat-own-token-not-default-shape",
            "API_POST_ENABLED": "true", "API_POST_URL": "https://logs.example.com", "API_POST_AUTH_TOKEN": "rcv-secret-9"}
    off = load_config(None, base)
    assert Redactor.from_settings(off.log_redact_patterns, off.secrets()) is None
    on = load_config(None, {**base, "LOG_REDACT_PATTERNS": "ACME-[0-9]+"})
    redactor = Redactor.from_settings(on.log_redact_patterns, on.secrets())
    assert redactor is not None
    masked, count = redactor.redact_bytes(b"ACME-42 glpat-own-token-not-default-shape rcv-secret-9")
    assert (masked, count) == (b"[MASKED] [MASKED] [MASKED]", 3)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"export GITLAB_TOKEN=glpat-AbCdEfGhIjKlMnOpQrSt12\n", b"export GITLAB_TOKEN=[MASKED]\n"),
    (b"routable glpat-AbCdEfGhIjKlMnOpQrStUv.01.0w1a2b3c4 done", b"routable [MASKED] done"),
    (b"runner: glrt-t1_AbCdEfGhIjKlMnOpQrSt ok", b"runner: [MASKED] ok"),
    (b"deploy gldt-AbCdEfGhIjKlMnOpQrSt12 / job glcbt-64_AbCdEfGhIjKlMnOpQrSt", b"deploy [MASKED] / job [MASKED]"),
    (b"register GR1348941AbCdEfGhIjKlMnOpQrSt12", b"register [MASKED]"),
    (b"key AKIAIOSFODNN7EXAMPLE used", b"key [MASKED] used"),
    (b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", b"aws_secret_access_key = [MASKED]\n"),
    (b'"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
     b'"AWS_SECRET_ACCESS_KEY": "[MASKED]"'),
    (b"> Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc-def_ghi\r\n", b"> Authorization: [MASKED]\r\n".replace(
        b"[MASKED]", b"Bearer [MASKED]")),
    (b"before\n" + PRIVATE_KEY + b"\nafter", b"before\n[MASKED]\nafter"),
    (b"-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKC\n\x1b[0Ksection_end:1:x", b"[MASKED]\x1b[0Ksection_end:1:x"),
    (b"\xff\xfe glpat-AbCdEfGhIjKlMnOpQrSt12 \xc3", b"\xff\xfe [MASKED] \xc3"),  # invalid UTF-8 around it
    # left alone: too short to be tokens, or prose
    (b"glpat-short the bearer of bad news AKIA123", b"glpat-short the bearer of bad news AKIA123"),
    (b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----", b"-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----"),
])
def test_default_set(raw: bytes, expected: bytes) -> None:
    assert DEFAULT.redact_bytes(raw)[0] == expected


SECRETS = [b"glpat-AbCdEfGhIjKlMnOpQrSt12", b"AKIAIOSFODNN7EXAMPLE", b"Bearer abcdefgh12345678zz", PRIVATE_KEY]


@pytest.mark.parametrize("secret", SECRETS, ids=["gitlab", "aws", "bearer", "private-key"])
@pytest.mark.parametrize("shift", [-1, 0, 1, 7, 20, 2000, 28000])
def test_a_secret_straddling_a_chunk_boundary_is_masked(secret: bytes, shift: int, tmp_path: Path) -> None:
    start = CHUNK - min(shift, len(secret) - 1) if shift >= 0 else CHUNK + 3
    data = b"x " * (start // 2) + b" " * (start % 2) + secret + b" tail\n" + b"y" * (CHUNK + 100)
    path = tmp_path / "job.log"
    path.write_bytes(data)
    assert DEFAULT.redact_file(path) >= 1
    masked = path.read_bytes()
    assert secret[-12:] not in masked and b"[MASKED]" in masked
    assert masked == DEFAULT.redact_bytes(data)[0]  # streaming gives exactly what a whole-buffer pass gives


def test_streaming_equals_whole_buffer_for_any_piece_sizes() -> None:
    rng = random.Random(7)
    pieces = []
    for _ in range(300):
        pieces.append(bytes(rng.choice(b"ab \n-=") for _ in range(rng.randint(0, 3000))))
        pieces.append(rng.choice(SECRETS + [b"password=hunter2!", b"ACME-1234abcd"]))
    data = b"".join(pieces)
    redactor = Redactor([*parse_patterns(r"default;;password=(?P<secret>\S+);;ACME-[0-9a-f]{8}")])
    whole, count = redactor.redact_bytes(data)
    maskers = [StreamMasker(p, window=MAX_MATCH) for p in redactor.patterns]
    out, position = [], 0
    while position <= len(data):
        size = rng.choice([1, 7, 100, 4096, 65536, 300_000])
        chunk, final = data[position:position + size], position + size > len(data)
        position += size
        for masker in maskers:
            chunk = masker.feed(chunk, final=final)
        out.append(chunk)
        if final:
            break
    assert b"".join(out) == whole
    assert count == sum(m.masked for m in maskers) >= 300
    assert b"hunter2" not in whole and b"password=[MASKED]" in whole


def test_memory_stays_bounded_on_a_long_log() -> None:
    masker = StreamMasker(re.compile(DEFAULT_PATTERNS["private-key"].encode()))
    chunk = b"-----BEGIN RSA PRIVATE KEY-----\n" + b"A" * (CHUNK - 40) + b"\n"  # unterminated blocks, forever
    largest = 0
    for _ in range(40):  # 10 MiB
        masker.feed(chunk)
        largest = max(largest, len(masker._buf))
    assert largest <= CHUNK + MAX_MATCH + CONTEXT


def test_the_document_and_the_files_get_the_masked_log(tmp_path: Path, receiver: Receiver) -> None:
    world = World()
    project = world.add_project("team/app", name="app")
    log = (b"$ ./deploy.sh\nusing glpat-AbCdEfGhIjKlMnOpQrSt12 and password=hunter2\n" + PRIVATE_KEY
           + b"\nAuthorization: Bearer abcdefgh12345678\ndone \xff\n")
    pipeline = world.add_pipeline(project.id, status="success", jobs=[JobSpec("deploy", "deploy", "success", log=log)])
    with GitLabSimulator(world) as sim:
        env = make_env(tmp_path, sim, receiver, API_POST_SAVE_TO_FILE="true",
                       LOG_REDACT_PATTERNS=r"default;;password=(?P<secret>\S+)")
        result = env.invoke("run", "--once")
        assert result.exit_code == 0, result.output
        assert "masked 4 secret(s)" in result.output
        expected = (b"$ ./deploy.sh\nusing [MASKED] and password=[MASKED]\n[MASKED]\nAuthorization: Bearer [MASKED]"
                    b"\ndone \xff\n")
        [doc] = documents(receiver)
        assert doc["jobs"][0]["log_content"] == expected.decode("utf-8", errors="replace")
        [log_file] = env.output.rglob(f"pipeline_{pipeline.id}/job_*.log")
        assert log_file.read_bytes() == expected
        meta = json.loads((log_file.parent / "metadata.json").read_text("utf-8"))
        assert list(meta["jobs"].values())[0]["log_file"] == log_file.name

        receiver.clear()
        plain = make_env(tmp_path / "off", sim, receiver)  # off by default: the log as GitLab has it
        assert plain.invoke("run", "--once").exit_code == 0
        [doc] = documents(receiver)
        assert "hunter2" in doc["jobs"][0]["log_content"]
