"""`python app/app.py`: localhost by default, sharing only on request, clear errors for bad arguments."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from nblora_diffusion.testing import tiny_sd_path

from app_harness import REPO, app_module


def test_binds_localhost_and_shares_only_with_the_flag():
    args = app_module().parse_args([])
    assert (args.host, args.port, args.share, args.base_model) == ("127.0.0.1", 7860, False, None)
    assert app_module().parse_args(["--share"]).share is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "error: --port must be in [1, 65535], got 70000"),
        (["--port", "http"], "error: argument --port: invalid int value: 'http'"),
        (["--tiny", "--base_model", "x"], "error: give either --tiny or --base_model"),
    ],
)
def test_bad_arguments_exit_nonzero_with_an_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        app_module().main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_busy_port_is_an_error_line_not_a_traceback(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = app_module().main(
            ["--base_model", str(tiny_sd_path()), "--port", str(port), "--output_dir", str(tmp_path)]
        )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: Cannot find empty port") and "Traceback" not in err


def test_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "app/app.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--base_model" in done.stdout and "localhost" in done.stdout
